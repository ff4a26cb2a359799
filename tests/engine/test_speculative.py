"""Speculative decoding by prompt lookup without a model: the proposer and acceptance as pure functions,
the config and the bucket plan, the scheduler's verify steps with plain integers (a KV store in a dict
checks every slot a row reads), and the engine end to end with the fake runner's looping model: the
same tokens, text and finish as one token a step."""

import asyncio

import numpy as np
import pytest

from kvloom.engine.buckets import BucketPlan
from kvloom.engine.config import ConfigError, EngineConfig, SchedulerConfig, SpeculativeConfig
from kvloom.engine.engine import Engine
from kvloom.engine.output import token_finish
from kvloom.engine.request import FinishReason, Request, ResponseFormat, SamplingParams
from kvloom.engine.speculative import SpecDecodeStats, may_draft, num_accepted, propose_ngram
from tests import fake_runner
from tests.conftest import tiny_engine_config
from tests.engine.test_scheduler import make_request, make_scheduler

pytestmark = pytest.mark.timeout(60)

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4)


# ---- the proposer and acceptance ------------------------------------------------------------------

def naive_proposal(seq, k, max_n, min_n):
    """The definition, spelled out: the latest earlier occurrence of the longest suffix n-gram, then the
    tokens after it, the sequence read as continuing its own copy."""
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == seq[len(seq) - n:]:
                ext = list(seq)
                for i in range(k):
                    ext.append(ext[start + n + i])
                return tuple(ext[len(seq):])
    return ()


def test_propose_takes_the_latest_occurrence_of_the_longest_ngram():
    seq = [1, 2, 3, 4, 0, 1, 2, 3, 9, 8, 7, 1, 2, 3]
    assert propose_ngram(seq, 2, 3, 1) == (9, 8)  # [1, 2, 3] at 0 and 5: the latest wins
    seq = [6, 7, 1, 3, 9, 7, 2, 4, 6, 7]
    assert propose_ngram(seq, 2, 2, 1) == (1, 3)  # the bigram [6, 7] beats the later unigram [7]
    assert propose_ngram(seq, 2, 1, 1) == (2, 4)


def test_propose_copies_a_loop_past_the_end_and_finds_nothing_without_a_repeat():
    assert propose_ngram([4, 5, 4, 5], 4, 3, 1) == (4, 5, 4, 5)
    assert propose_ngram([7, 7], 4, 3, 1) == (7, 7, 7, 7)
    assert propose_ngram([1, 2, 3, 4], 4, 3, 1) == ()
    assert propose_ngram([1, 2, 9, 2], 4, 3, 2) == ()  # only a unigram recurs: below min_n
    assert propose_ngram([1, 2, 9, 2], 2, 3, 1) == (9, 2)
    assert propose_ngram([5], 4, 3, 1) == () and propose_ngram([5, 5], 0, 3, 1) == ()


def test_propose_matches_the_definition_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(300):
        seq = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        k, max_n = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        min_n = int(rng.integers(1, max_n + 1))
        assert propose_ngram(seq, k, max_n, min_n) == naive_proposal(seq, k, max_n, min_n), (seq, k, max_n)


def test_num_accepted_is_the_confirmed_prefix():
    assert num_accepted([5, 6, 7], [5, 6, 9, 1]) == 2
    assert num_accepted([5, 6, 7], [5, 6, 7, 1]) == 3
    assert num_accepted([5], [4, 5]) == 0
    assert num_accepted([5, 9, 7], [5, 6, 7, 1]) == 1  # nothing after the first miss counts
    assert num_accepted([], [3]) == 0


def test_only_plain_greedy_requests_draft():
    def request(**params):
        return Request("r", (3, 4), SamplingParams(**dict(dict(temperature=0.0, max_tokens=8), **params)))

    assert may_draft(request())
    assert may_draft(request(stop=["x"], stop_token_ids=[5], ignore_eos=True, seed=3))
    for params in (dict(temperature=0.5), dict(repetition_penalty=1.2), dict(presence_penalty=0.5),
                   dict(logit_bias={5: 1.0}), dict(logprobs=0), dict(prompt_logprobs=0), dict(min_tokens=2)):
        assert not may_draft(request(**params)), params
    banning = request(min_tokens=2)
    banning.output_ids += [5, 6]
    assert may_draft(banning)  # min_tokens no longer bans anything
    structured = request()
    structured.grammar = ResponseFormat.json_object()  # any matcher: its presence is what counts
    assert not may_draft(structured)


def test_stats_count_drafts_acceptance_and_positions():
    stats = SpecDecodeStats()
    assert stats.as_dict()["acceptance_rate"] == 0.0 and stats.as_dict()["mean_tokens_per_verify_step"] == 0.0
    stats.record(4, 2)
    stats.record(3, 3)
    d = stats.as_dict()
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (2, 7, 5)
    assert d["accepted_per_position"] == [2, 2, 1, 0]
    assert d["acceptance_rate"] == pytest.approx(5 / 7)
    assert d["mean_tokens_per_verify_step"] == pytest.approx(3.5)
    earlier = SpecDecodeStats(1, 4, 2, [1, 1, 0, 0])
    assert stats.since(earlier) == SpecDecodeStats(1, 3, 3, [1, 1, 1, 0])


# ---- config and compiled shapes -------------------------------------------------------------------

def test_config_is_off_by_default_and_validated_naming_the_field():
    assert not EngineConfig().speculative.enabled and EngineConfig().speculative.verify_len == 0
    assert SpeculativeConfig(method="ngram", num_speculative_tokens=3).verify_len == 4
    for kwargs, field in [(dict(method="eagle"), "method"),
                          (dict(num_speculative_tokens=0), "num_speculative_tokens"),
                          (dict(num_speculative_tokens=17), "num_speculative_tokens"),
                          (dict(num_speculative_tokens=True), "num_speculative_tokens"),
                          (dict(prompt_lookup_max=0), "prompt_lookup_max"),
                          (dict(prompt_lookup_min=4, prompt_lookup_max=3), "prompt_lookup_min"),
                          (dict(disable_by_batch_size=0), "disable_by_batch_size")]:
        with pytest.raises(ConfigError, match=f"^{field}:"):
            SpeculativeConfig(**kwargs)


def test_verify_shapes_exist_only_with_speculation():
    cfg = SchedulerConfig(max_running=8, max_tokens_per_step=64, chunk_size=32)
    plain, spec = BucketPlan.from_config(cfg), BucketPlan.from_config(cfg, speculative=NGRAM)
    assert not [s for s in plain.all_shapes() if s.verify_len]
    verify = [s for s in spec.all_shapes() if s.verify_len]
    assert [(s.num_decode_rows, s.num_prefill_rows, s.verify_len) for s in verify] == \
        [(d, 0, 5) for d in (1, 2, 4, 8)]
    shape = spec.verify_shape(3)
    assert (shape.num_decode_rows, shape.num_tokens, spec.logits_rows(shape)) == (4, 20, 20)
    assert [s for s in spec.all_shapes() if not s.verify_len] == plain.all_shapes()


# ---- the scheduler, with plain integers -----------------------------------------------------------

VOCAB = 97


def looping(seq) -> int:
    return fake_runner.looping_next_token(seq[-1], len(seq) - 1, VOCAB)


def reference(prompt, max_tokens):
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(looping(seq))
    return seq[len(prompt):]


class KVStore:
    """The compute thread with a KV cache of token ids by slot: a row reads its past through its page
    table (every slot must hold the token the request has there: a rejected draft counted as computed,
    or cached, would show up here) and writes its tokens and drafts; the greedy token after each of
    them comes from `looping`."""

    def __init__(self, s):
        self.s, self.slots = s, {}

    def slot(self, row, position):
        ps = self.s.page_size
        return row.page_ids[position // ps] * ps + position % ps

    def __call__(self, batch):
        from kvloom.engine.batch import StepResult

        tokens, verify = [], np.zeros((len(batch.rows), max(1, batch.shape.verify_len)), np.int64)
        for i, row in enumerate(batch.rows):
            request = self.s.requests[row.request_id]
            seq = row.token_ids + row.draft_token_ids
            assert row.token_ids == request.tokens(row.start_pos, row.start_pos + len(row.token_ids))
            assert len(row.page_ids) * self.s.page_size >= row.start_pos + len(seq)
            assert len(row.draft_token_ids) <= request.params.max_tokens - len(request.output_ids) - 1
            past = request.tokens(0, row.start_pos)
            assert [self.slots.get(self.slot(row, p)) for p in range(row.start_pos)] == list(past)
            for j, t in enumerate(seq):
                self.slots[self.slot(row, row.start_pos + j)] = t
            n = len(row.token_ids)
            greedy = [looping(past + seq[:j + 1]) for j in range(n - 1, len(seq))]
            tokens.append(greedy[0])
            verify[i, :len(greedy)] = greedy
        return StepResult(batch.step_id, np.asarray(tokens),
                          verify_token_ids=verify if batch.shape.verify_len else None)


def run(s, max_steps=500, on_step=None, compute=None):
    compute, batches = compute or KVStore(s), []
    while s.has_work and len(batches) < max_steps:
        batch = s.schedule()
        batches.append(batch)
        if on_step:
            on_step(batch)
        for request in s.apply(batch, compute(batch)):
            decision = None if request.is_finished else token_finish(request, s.max_model_len)
            if decision is not None:
                s.finish(request, *decision)
    assert not s.has_work
    return batches


PROMPTS = [[3, 4, 5, 6, 7, 3, 4], [9, 10, 11, 12, 13], [20, 21, 3, 4, 5, 20, 21, 3, 22], [40] * 9]


def test_verify_steps_give_the_tokens_of_one_token_a_step():
    for spec in (SpeculativeConfig(), NGRAM, SpeculativeConfig(method="ngram", num_speculative_tokens=2)):
        s = make_scheduler(speculative=spec, budget=32, chunk=16)
        requests = [make_request(f"r{i}", p, max_tokens=m) for i, (p, m) in
                    enumerate(zip(PROMPTS, (30, 17, 23, 9)))]
        for r in requests:
            s.add(r)
        batches = run(s, on_step=lambda b: assert_budget(b, 32))
        for r in requests:
            assert r.output_ids == reference(r.prompt_ids, r.params.max_tokens), (spec, r.request_id)
            assert r.finish_reason is FinishReason.LENGTH
        verify = [b for b in batches if b.shape.verify_len]
        if not spec.enabled:
            assert not verify and s.spec_stats.num_drafts == 0
            continue
        assert verify and all(not b.prefill_rows for b in verify)
        assert max(len(row.draft_token_ids) for b in verify for row in b.rows) == spec.num_speculative_tokens
        stats = s.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # some drafts stood, some fell
        assert len(batches) < len(run_plain_steps())  # fewer steps than one token a step


def assert_budget(batch, budget):
    assert batch.num_tokens <= budget


def run_plain_steps():
    s = make_scheduler(budget=32, chunk=16)
    for i, (p, m) in enumerate(zip(PROMPTS, (30, 17, 23, 9))):
        s.add(make_request(f"r{i}", p, max_tokens=m))
    return run(s)


def test_the_prefix_cache_serves_only_confirmed_tokens():
    s = make_scheduler(speculative=NGRAM, num_pages=128)
    first, kv = make_request("a", PROMPTS[0], max_tokens=40), KVStore(s)
    s.add(first)
    run(s, compute=kv)
    assert 0 < s.spec_stats.num_accepted_tokens < s.spec_stats.num_draft_tokens
    # The whole first sequence as a prompt: its pages, written by verify steps, come from the cache, and
    # the KV store checks every slot the new request reads.
    prompt = first.prompt_ids + tuple(first.output_ids)
    second = make_request("b", prompt, max_tokens=12)
    s.add(second)
    run(s, compute=kv)
    assert second.num_cached_tokens >= len(first.prompt_ids) + 32
    assert second.output_ids == reference(prompt, 12)


def test_drafts_never_evict_or_preempt_and_take_the_slots_held():
    s = make_scheduler(speculative=NGRAM, num_pages=5, page_size=4, budget=16, chunk=16)  # 4 usable pages
    s.add(make_request("cached", [50, 51, 52, 53, 54, 55, 56, 57], max_tokens=1))
    run(s)
    assert s.prefix_cache.num_cached_pages == 2 and s.allocator.num_free_pages == 2
    r = make_request("a", [3, 4, 5, 6, 7, 3], max_tokens=10)
    s.add(r)
    s.apply(prefill := s.schedule(), KVStore(s)(prefill))  # 6 tokens in 2 pages; the pool is dry
    assert s.allocator.num_free_pages == 0 and len(r.output_ids) == 1
    batch = s.schedule()
    # 4 drafts found, but the 7th token's page has one slot left and no page is free: one draft
    assert batch.shape.verify_len and batch.decode_rows[0].draft_token_ids == (5,)
    cached = s.prefix_cache.match_prefix([50, 51, 52, 53, 54, 55, 56, 57, 1], count_stats=False)
    assert cached.num_tokens == 8 and s.num_preemptions == 0  # nothing evicted, nobody preempted


def test_schedule_changes_no_request_on_a_verify_step():
    s = make_scheduler(speculative=NGRAM)
    r = make_request("a", PROMPTS[0], max_tokens=20)
    s.add(r)
    s.apply(prefill := s.schedule(), KVStore(s)(prefill))
    before = (list(r.output_ids), r.num_computed_tokens, r.version)
    batch = s.schedule()
    assert batch.decode_rows[0].draft_token_ids
    assert (list(r.output_ids), r.num_computed_tokens, r.version) == before
    again = s.schedule()  # the first batch was never applied: the same row again
    assert again.decode_rows[0].draft_token_ids == batch.decode_rows[0].draft_token_ids


def test_no_drafts_beside_prefill_chunks_or_past_the_batch_size_limit():
    s = make_scheduler(speculative=NGRAM, budget=32, chunk=16)
    a = make_request("a", PROMPTS[0], max_tokens=30)
    s.add(a)
    s.apply(prefill := s.schedule(), KVStore(s)(prefill))
    s.add(make_request("b", list(range(20, 60)), max_tokens=2))  # a long prompt: chunks of 16
    batch = s.schedule()
    assert batch.prefill_rows and not batch.shape.verify_len
    assert not any(row.draft_token_ids for row in batch.rows)

    limited = SpeculativeConfig(method="ngram", disable_by_batch_size=1)
    s = make_scheduler(speculative=limited)
    for i in range(2):
        s.add(make_request(f"r{i}", PROMPTS[0], max_tokens=12))
    batches = run(s)
    decoding_together = [b for b in batches if len(b.decode_rows) == 2]
    assert decoding_together and not any(b.shape.verify_len for b in decoding_together)


# ---- the engine, with the fake runner's looping model ---------------------------------------------

def looping_engine(model, speculative=SpeculativeConfig(), **kw):
    config = tiny_engine_config(model, speculative=speculative)
    return Engine(config, runner_factory=fake_runner.factory(next_token=fake_runner.looping_next_token, **kw))


async def outputs(engine, prompt, params):
    outs = [o async for o in engine.generate(prompt, params)]
    last = outs[-1]
    return dict(ids=[t for o in outs for t in o.token_ids], text="".join(o.text for o in outs),
                finish=(last.finish_reason, last.stop_reason), usage=last.usage,
                logprobs=[lp.logprob for o in outs for lp in o.logprobs], deltas=len(outs),
                prompt_logprobs=[o.prompt_logprobs for o in outs if o.prompt_logprobs])


def latest_first_substring(text: str, n: int) -> str:
    """The n-character piece of text whose first appearance comes last (a stop string that lets the
    generation run longest)."""
    return max((text[i:i + n] for i in range(len(text) - n + 1)), key=text.index)


async def test_engine_output_is_the_same_with_and_without_speculation(tiny_llama):
    loop_prompt = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3]
    async with looping_engine(tiny_llama) as plain:
        free_text = (await outputs(plain, loop_prompt, SamplingParams(max_tokens=40, temperature=0)))["text"]
    stop = latest_first_substring(free_text, 3)
    cases = [
        (loop_prompt, SamplingParams(max_tokens=40, temperature=0)),
        (loop_prompt, SamplingParams(max_tokens=13, temperature=0)),  # ends inside a verify step's reach
        (loop_prompt, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[7])),
        (loop_prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop])),
        (loop_prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop],
                                     include_stop_str_in_output=True)),
        ("Hello world", SamplingParams(max_tokens=25, temperature=0)),
        (loop_prompt, SamplingParams(max_tokens=20, temperature=0.8, seed=5)),  # decode normally beside
        (loop_prompt, SamplingParams(max_tokens=20, temperature=0, logprobs=2)),
        (loop_prompt, SamplingParams(max_tokens=20, temperature=0, min_tokens=6)),
        (loop_prompt, SamplingParams(max_tokens=20, temperature=0, prompt_logprobs=1)),
    ]
    results = {}
    for name, spec in (("plain", SpeculativeConfig()), ("ngram", NGRAM)):
        async with looping_engine(tiny_llama, spec) as engine:
            # every case at once, twice over (n > 1 is several requests of one prompt)
            results[name] = await asyncio.gather(*[outputs(engine, p, params) for p, params in cases * 2])
            stats = engine.spec_stats
            batches = engine.runner.batches
    for i, (plain, spec) in enumerate(zip(results["plain"], results["ngram"])):
        for key in ("ids", "text", "finish", "usage", "logprobs", "prompt_logprobs"):
            assert plain[key] == spec[key], (cases[i % len(cases)], key)
    assert results["plain"][3]["finish"] == (FinishReason.STOP, stop) and len(results["plain"][3]["ids"]) > 8
    assert results["plain"][2]["finish"] == (FinishReason.STOP, 7)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert any(r["deltas"] < len(r["ids"]) for r in results["ngram"])  # outputs carried several tokens
    assert all(r["deltas"] == len(r["ids"]) for r in results["plain"])
    verify_rows = [row for b in batches if b.shape.verify_len for row in b.decode_rows]
    drafting = {row.request_id for row in verify_rows if row.draft_token_ids}
    beside = {row.request_id for row in verify_rows if not row.draft_token_ids}
    assert drafting and beside  # sampled, logprobs and min_tokens rows decoded inside verify steps
    assert results["ngram"][9]["prompt_logprobs"]


async def test_abort_mid_request_frees_pages(tiny_llama):
    async with looping_engine(tiny_llama, NGRAM) as engine:
        s = engine.scheduler
        stream = engine.generate([3, 4, 5, 6, 7, 3, 4], SamplingParams(max_tokens=200, temperature=0))
        async for out in stream:
            if len(out.token_ids) > 1:
                break
        await stream.aclose()
        assert not s.has_work and s.allocator.num_used_pages == s.prefix_cache.num_cached_pages
        assert engine.spec_stats.num_accepted_tokens > 0


async def test_restart_in_place_keeps_output_and_counters(tiny_llama):
    params = SamplingParams(max_tokens=30, temperature=0)
    async with looping_engine(tiny_llama, NGRAM) as engine:
        before = await outputs(engine, [3, 4, 5, 6, 7, 3], params)
        drafts = engine.spec_stats.num_draft_tokens
        await engine.restart()
        assert engine.is_ready
        after = await outputs(engine, [3, 4, 5, 6, 7, 3], params)
        assert (after["ids"], after["text"]) == (before["ids"], before["text"])
        assert engine.spec_stats.num_draft_tokens > drafts  # one engine's counters, across the restart


async def test_metrics_and_status_report_drafts(tiny_llama):
    async with looping_engine(tiny_llama, NGRAM) as engine:
        await outputs(engine, [3, 4, 5, 6, 7, 3], SamplingParams(max_tokens=30, temperature=0))
        stats, status = engine.spec_stats, engine.status()
        text = engine.metrics.render().decode()
        for name, value in (("num_drafts", stats.num_drafts), ("num_draft_tokens", stats.num_draft_tokens),
                            ("num_accepted_tokens", stats.num_accepted_tokens)):
            assert f'vllm:spec_decode_{name}_total{{model_name="llama"}} {float(value)}' in text
        assert status["config"]["speculative"] == "ngram" and status["config"]["num_speculative_tokens"] == 4
        assert status["speculative"]["num_accepted_tokens"] == stats.num_accepted_tokens > 0
        assert 1 < status["speculative"]["mean_tokens_per_verify_step"] <= 5
    async with looping_engine(tiny_llama) as engine:
        await outputs(engine, [3, 4, 5, 6, 7, 3], SamplingParams(max_tokens=30, temperature=0))
        assert engine.status()["speculative"] is None and engine.spec_stats.num_drafts == 0
        assert not any(b.shape.verify_len for b in engine.runner.batches)
        text = engine.metrics.render().decode()
        assert 'vllm:spec_decode_num_draft_tokens_total{model_name="llama"} 0.0' in text
