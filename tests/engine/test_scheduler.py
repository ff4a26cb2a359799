"""The scheduler with plain integers: a hand-computable 'model' stands in for the runner."""

import numpy as np
import pytest

from kvloom.engine.buckets import BucketPlan
from kvloom.engine.config import SchedulerConfig, SpeculativeConfig
from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import make_prefix_cache
from kvloom.engine.request import FinishReason, Request, RequestState, SamplingParams
from kvloom.engine.batch import StepResult
from kvloom.engine.output import token_finish
from kvloom.engine.scheduler import QueueFullError, Scheduler, check_fits

VOCAB = 97


def model_token(seq) -> int:
    """The next token as a function of the whole sequence, so any misplaced token changes everything after."""
    return 3 + (sum(seq) * 31 + len(seq) * 7) % (VOCAB - 3)


def reference(prompt, max_tokens):
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(model_token(seq))
    return seq[len(prompt):]


def make_scheduler(*, num_pages=64, page_size=4, max_running=4, budget=32, chunk=16, max_prefill=2,
                   policy="fcfs", prefix_cache=True, max_model_len=256, max_waiting=100,
                   speculative=SpeculativeConfig()):
    cfg = SchedulerConfig(max_running=max_running, max_tokens_per_step=budget, chunk_size=chunk,
                          max_prefill_seqs=max_prefill, policy=policy, max_waiting=max_waiting)
    allocator = PageAllocator(num_pages)
    cache = make_prefix_cache(allocator, page_size, prefix_cache)
    s = Scheduler(cfg, BucketPlan.from_config(cfg, speculative=speculative), allocator, cache,
                  page_size=page_size, speculative=speculative)
    s.max_model_len = max_model_len  # for `step` below (the engine holds it in production)
    return s


def make_request(rid, prompt, max_tokens=8, **params):
    return Request(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
                   eos_token_ids=(2,))


def prompt_logprob(position: int, token: int) -> float:
    """The 'model's logprob of prompt token `token` at `position`."""
    return -position - token / 1000


def compute(s: Scheduler, batch) -> StepResult:
    """The 'compute thread': reads only the snapshot, checks it against the request it came from."""
    tokens, prompt = [], []
    for row in batch.rows:
        request = s.requests[row.request_id]
        end = row.start_pos + len(row.token_ids)
        assert row.token_ids == request.tokens(row.start_pos, end)
        assert len(row.page_ids) * s.page_size >= end
        tokens.append(model_token(request.tokens(0, end)))
        assert row.prompt_targets == request.prompt_ids[row.start_pos + 1:][:len(row.prompt_targets)]
        prompt += [prompt_logprob(row.start_pos + 1 + i, t) for i, t in enumerate(row.prompt_targets)]
    top = np.tile([[5, 6]], (len(prompt), 1))
    return StepResult(batch.step_id, np.asarray(tokens), prompt_logprobs=np.asarray(prompt),
                      prompt_top_ids=top, prompt_top_logprobs=top * -1.0)


def step(s: Scheduler, batch) -> list[Request]:
    """Compute and apply one batch, then end the requests whose new token finishes them (as the engine
    does)."""
    updated = s.apply(batch, compute(s, batch))
    for request in updated:
        decision = None if request.is_finished else token_finish(request, s.max_model_len)
        if decision is not None:
            s.finish(request, *decision)
    return updated


def run(s: Scheduler, max_steps=1000, on_step=None):
    batches = []
    while s.has_work and len(batches) < max_steps:
        batch = s.schedule()
        assert batch is not None, "work but nothing schedulable"
        batches.append(batch)
        if on_step:
            on_step(batch)
        step(s, batch)
    assert not s.has_work
    return batches


def test_chunked_prefill_then_decode():
    s = make_scheduler(chunk=16, budget=32)
    prompt = list(range(10, 50))
    r = make_request("a", prompt, max_tokens=5)
    s.add(r)
    batches = run(s)
    assert [len(b.prefill_rows[0].token_ids) for b in batches[:3]] == [16, 16, 8]
    assert [b.prefill_rows[0].sample for b in batches[:3]] == [False, False, True]
    assert all(len(b.decode_rows) == 1 and not b.prefill_rows for b in batches[3:])
    assert r.output_ids == reference(prompt, 5)
    assert r.finish_reason is FinishReason.LENGTH


def test_continuous_batching_join_leave_and_decodes_never_stall():
    s = make_scheduler(chunk=8, budget=16, max_running=4)
    a = make_request("a", [5, 6, 7], max_tokens=12)
    s.add(a)
    for _ in range(3):
        batch = s.schedule()
        step(s, batch)
    long_prompt = list(range(20, 60))
    b = make_request("b", long_prompt, max_tokens=3)
    s.add(b)

    def check(batch):
        ids = [row.request_id for row in batch.rows]
        if a.state is RequestState.RUNNING:
            assert "a" in [row.request_id for row in batch.decode_rows]  # a decodes every step
        assert batch.num_tokens <= 16
        assert len(set(ids)) == len(ids)

    batches = run(s, on_step=check)
    # b joined at the very next step, beside a's decode
    assert {row.request_id for row in batches[0].rows} == {"a", "b"}
    assert a.output_ids == reference([5, 6, 7], 12) and b.output_ids == reference(long_prompt, 3)


def test_limits_max_running_and_budget():
    s = make_scheduler(max_running=2, budget=12, chunk=8)
    requests = [make_request(f"r{i}", [i + 3] * 6, max_tokens=4) for i in range(5)]
    for r in requests:
        s.add(r)

    def check(batch):
        assert len(s.running) <= 2 and len(batch.rows) <= 2
        assert batch.num_tokens <= 12

    run(s, on_step=check)
    for r in requests:
        assert r.output_ids == reference(r.prompt_ids, 4)


def test_queue_full():
    s = make_scheduler(max_waiting=2)
    s.add(make_request("a", [3, 4]))
    s.add(make_request("b", [3, 4]))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add(make_request("c", [3, 4]))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_preemption_loses_and_duplicates_nothing(prefix_cache):
    # 12 usable pages of 4 tokens: four requests of 8 + 24 tokens cannot all fit.
    s = make_scheduler(num_pages=13, page_size=4, max_running=4, budget=32, chunk=16,
                       prefix_cache=prefix_cache)
    requests = [make_request(f"r{i}", list(range(3 + i, 11 + i)), max_tokens=24) for i in range(4)]
    for r in requests:
        s.add(r)
    run(s)
    assert s.num_preemptions > 0
    for r in requests:
        assert r.output_ids == reference(r.prompt_ids, 24), r.request_id
        assert r.pages == []
    # Only the prefix cache holds pages now, one reference each.
    s.prefix_cache.reset()
    assert s.allocator.num_free_pages == s.allocator.num_usable_pages


def test_stale_snapshot_never_overwrites_fresh_tokens():
    s = make_scheduler()
    r = make_request("a", [7, 8, 9, 10, 11], max_tokens=6)
    s.add(r)
    for _ in range(3):
        batch = s.schedule()
        step(s, batch)
    stale = s.schedule()  # a decode snapshot of r...
    stale_result = compute(s, stale)
    s._preempt(r)  # ...then r is preempted before that result comes back
    while r.num_computed_tokens < r.num_tokens - 1 or r.state is not RequestState.RUNNING:
        fresh = s.schedule()  # r is recomputed and moves on
        step(s, fresh)
    fresh = s.schedule()
    step(s, fresh)
    before = list(r.output_ids)
    assert s.apply(stale, stale_result) == []  # the stale result is dropped...
    assert r.output_ids == before  # ...and changes nothing
    run(s)
    assert r.output_ids == reference([7, 8, 9, 10, 11], 6)


def test_result_for_aborted_request_is_dropped():
    s = make_scheduler()
    r = make_request("a", [7, 8, 9], max_tokens=6)
    s.add(r)
    batch = s.schedule()
    result = compute(s, batch)
    s.abort("a")
    assert s.apply(batch, result) == []
    assert r.output_ids == [] and r.finish_reason is FinishReason.ABORT
    assert s.allocator.num_used_pages == s.prefix_cache.num_cached_pages


def test_abort_frees_pages_waiting_and_running():
    s = make_scheduler(max_running=1, prefix_cache=False)
    a, b = make_request("a", [3] * 10, max_tokens=50), make_request("b", [4] * 10, max_tokens=50)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    step(s, batch)
    assert a.state is RequestState.RUNNING and b.state is RequestState.WAITING
    assert s.allocator.num_used_pages > 0
    s.abort("b")
    s.abort("a")
    assert s.allocator.num_used_pages == 0 and not s.has_work
    assert a.finish_reason is b.finish_reason is FinishReason.ABORT


def test_prefix_cache_reuse_and_stats():
    s = make_scheduler(page_size=4)
    prompt = list(range(3, 23))  # 20 tokens
    first = make_request("a", prompt, max_tokens=3)
    s.add(first)
    run(s)
    second = make_request("b", prompt, max_tokens=3)
    s.add(second)
    batch = s.schedule()
    # 19 computable tokens -> 16 whole pages' worth cached; 4 left to compute
    assert batch.prefill_rows[0].start_pos == 16 and second.num_cached_tokens == 16
    step(s, batch)
    run(s)
    assert second.output_ids == first.output_ids == reference(prompt, 3)
    cache = s.prefix_cache
    assert cache.num_queries == 2 and cache.num_hits == 1 and cache.num_hit_tokens == 16


def test_lpm_prefers_longest_cached_prefix():
    s = make_scheduler(policy="lpm", max_running=1, page_size=4)
    warm = make_request("warm", list(range(3, 19)), max_tokens=1)
    s.add(warm)
    run(s)
    cold = make_request("cold", list(range(50, 66)), max_tokens=1)
    hot = make_request("hot", list(range(3, 19)) + [90, 91], max_tokens=1)
    s.add(cold)
    s.add(hot)
    batch = s.schedule()
    assert [row.request_id for row in batch.rows] == ["hot"]


def test_finish_conditions():
    s = make_scheduler()
    prompt = [5, 6, 7]
    expected = reference(prompt, 8)
    stop_on = make_request("stop", prompt, max_tokens=8, stop_token_ids=(expected[2],))
    s.add(stop_on)
    run(s)
    assert stop_on.output_ids == expected[:3]
    assert stop_on.finish_reason is FinishReason.STOP and stop_on.stop_reason == expected[2]

    eos = Request("eos", tuple(prompt), SamplingParams(max_tokens=8, temperature=0.0),
                  eos_token_ids=(expected[1],))
    ignore = Request("ignore", tuple(prompt), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                     eos_token_ids=(expected[1],))
    s.add(eos)
    s.add(ignore)
    run(s)
    assert eos.output_ids == expected[:2] and eos.finish_reason is FinishReason.STOP
    assert ignore.output_ids == expected and ignore.finish_reason is FinishReason.LENGTH


def test_check_fits_names_the_field():
    check_fits(10, 5, 16)
    with pytest.raises(ValueError, match=r"^prompt: 16 tokens is at or over the context length 16"):
        check_fits(16, 1, 16)
    with pytest.raises(ValueError, match=r"^max_tokens: 7 does not fit.*at most 6"):
        check_fits(10, 7, 16)


def test_prompt_logprobs_are_recorded_once_through_the_prefix_cache_and_preemption():
    s = make_scheduler(chunk=8, budget=16, page_size=4)
    prompt = list(range(10, 40))  # 30 tokens: four chunks of 8
    run_one = make_request("warm", prompt, max_tokens=1)
    s.add(run_one)
    run(s)  # the prompt's pages are cached now
    r = make_request("r", prompt, max_tokens=2, prompt_logprobs=1)
    s.add(r)
    first = s.schedule()
    assert first.prefill_rows[0].start_pos == 0 and r.num_cached_tokens == 0  # no cached pages for it
    assert first.prefill_rows[0].prompt_targets == tuple(prompt[1:9])
    step(s, first)
    step(s, s.schedule())
    assert len(r.prompt_logprobs) == 16
    s._preempt(r)  # two chunks in: their 16 tokens' pages go to the cache
    again = s.schedule()
    assert again.prefill_rows[0].start_pos == 16  # served from the cache up to the recorded logprobs
    run(s)
    assert [lp.token_id for lp in r.prompt_logprobs] == prompt[1:]
    expected = [prompt_logprob(i, t) for i, t in enumerate(prompt) if i]
    assert [lp.logprob for lp in r.prompt_logprobs] == expected
    assert all(lp.top == ((5, -5.0),) for lp in r.prompt_logprobs)
    assert r.output_ids == reference(prompt, 2)


def test_prompt_targets_stop_once_recorded():
    s = make_scheduler(chunk=16, budget=32, page_size=4)
    prompt = list(range(10, 30))
    r = make_request("r", prompt, max_tokens=3, prompt_logprobs=0)
    s.add(r)
    batches = run(s)
    assert [len(row.prompt_targets) for b in batches for row in b.rows] == [16, 3, 0, 0]  # the last has none
    s2 = make_scheduler(chunk=16, budget=32, page_size=4)
    done = make_request("d", prompt, max_tokens=3, prompt_logprobs=0)
    s2.add(done)
    step(s2, s2.schedule())
    step(s2, s2.schedule())
    s2._preempt(done)  # after its first token: recomputing it adds no prompt targets
    rows = [row for b in run(s2) for row in b.rows]
    assert all(not row.prompt_targets for row in rows)
    assert len(done.prompt_logprobs) == len(prompt) - 1 and done.output_ids == reference(prompt, 3)


def test_max_tokens_zero_samples_nothing():
    s = make_scheduler(chunk=16, budget=32)
    r = make_request("r", list(range(10, 30)), max_tokens=0, prompt_logprobs=0)
    s.add(r)
    first = s.schedule()
    assert s.apply(first, compute(s, first)) == []  # one more chunk to go: no news
    last = s.schedule()
    assert [row.sample for row in last.rows] == [False]
    assert s.apply(last, compute(s, last)) == [r]  # news: its prompt logprobs, all there
    assert r.output_ids == [] and r.has_all_prompt_logprobs


def test_a_burst_of_short_prompts_is_prefilled_in_few_unpadded_steps():
    """The default menu: 32 prompts of 32 tokens at once are two steps of 16 rows x 32 tokens (the second
    with the first's 16 decode rows, so its last prompt is chunked and ends in a third), not eight steps
    of 4 rows padded to 64 tokens."""
    cfg = SchedulerConfig()
    allocator = PageAllocator(1024)
    s = Scheduler(cfg, BucketPlan.from_config(cfg), allocator, make_prefix_cache(allocator, 16, True),
                  page_size=16)
    s.max_model_len = 256
    for i in range(32):
        s.add(make_request(f"r{i}", [10 + i] * 32, max_tokens=4))
    prefill_steps = [b for b in run(s) if b.prefill_rows]
    shapes = [(b.shape.num_prefill_rows, b.shape.prefill_len) for b in prefill_steps]
    assert shapes == [(16, 32), (16, 32), (1, 16)]
    assert sum(b.num_prefill_tokens for b in prefill_steps) == 32 * 32
