"""One step ahead (`overlap_schedule`): the next decode step is built and launched before the running
step's result is applied. It must lose no token, keep every stream in order, and end exactly where the
synchronous loop ends, under aborts and restarts; the real runner's outputs are the same either way."""

import asyncio
import dataclasses

import numpy as np
import pytest

from kvloom.engine.batch import PENDING_TOKEN
from kvloom.engine.config import ConfigError
from kvloom.engine.engine import Engine
from kvloom.engine.output import token_finish
from kvloom.engine.request import FinishReason, SamplingParams
from tests import fake_runner
from tests.conftest import tiny_engine_config
from tests.engine.test_scheduler import compute, make_request, make_scheduler, reference

pytestmark = pytest.mark.timeout(120)


# ---- the scheduler, with the hand-computable model ------------------------------------------------

def run_ahead(s):
    """Drive the scheduler as the engine does with overlap on: the step after each one is built before
    that one's result is applied; its pending tokens are then filled from that result (as the runner
    does on the device) and checked against what apply() appended. Returns (batches, steps built ahead)."""
    batches, num_ahead, batch = [], 0, None
    while batch is not None or s.has_work:
        if batch is None:
            batch = s.schedule()
            assert batch is not None
        following = s.schedule_ahead(batch)
        result = compute(s, batch)
        for request in s.apply(batch, result):
            decision = None if request.is_finished else token_finish(request, s.max_model_len)
            if decision is not None:
                s.finish(request, *decision)
        batches.append(batch)
        if following is not None:
            num_ahead += 1
            rows = []
            for row in following.decode_rows:
                assert row.token_ids == (PENDING_TOKEN,) and row.pending_row >= 0
                token = int(result.token_ids[row.pending_row])
                request = s.requests.get(row.request_id)
                if request is not None:  # still running: its pending token is the one apply() appended
                    assert request.tokens(row.start_pos, row.start_pos + 1) == (token,)
                rows.append(dataclasses.replace(row, token_ids=(token,)))
            following = dataclasses.replace(following, decode_rows=tuple(rows))
        batch = following
    return batches, num_ahead


def test_steps_built_ahead_give_the_synchronous_outputs():
    s = make_scheduler(max_running=4, budget=32, chunk=8, num_pages=64)
    prompts = {f"r{i}": list(range(10 + i, 10 + i + 5 + 3 * i)) for i in range(6)}
    lengths = {rid: 3 + 4 * i for i, rid in enumerate(prompts)}
    stop_at = reference(prompts["r2"], lengths["r2"])[4]  # r2 ends on a stop token, which no step foresees
    requests = {rid: make_request(rid, p, max_tokens=lengths[rid],
                                  **({"stop_token_ids": (stop_at,)} if rid == "r2" else {}))
                for rid, p in prompts.items()}
    for r in requests.values():
        s.add(r)
    _, num_ahead = run_ahead(s)
    assert num_ahead > 10
    for rid, r in requests.items():
        expected = reference(prompts[rid], lengths[rid])
        if rid == "r2":
            expected = expected[:expected.index(stop_at) + 1]
        assert r.output_ids == expected, rid
    assert s.allocator.num_used_pages == s.prefix_cache.num_cached_pages  # every page back


def test_no_step_ahead_when_the_next_step_is_not_the_same_decodes():
    s = make_scheduler(max_running=2)
    s.add(make_request("a", [5, 6, 7], max_tokens=4))
    first = s.schedule()
    assert s.schedule_ahead(first) is not None  # a decode of "a" one position on
    s = make_scheduler(max_running=2)
    s.add(make_request("a", [5, 6, 7], max_tokens=4))
    first = s.schedule()
    s.add(make_request("b", [8, 9], max_tokens=4))
    assert s.schedule_ahead(first) is None, "a waiting request: admission is the synchronous schedule's"
    s = make_scheduler()
    s.add(make_request("a", [5, 6, 7], max_tokens=1))
    assert s.schedule_ahead(s.schedule()) is None, "the pending token is its last"
    s = make_scheduler()
    s.add(make_request("a", [5, 6, 7], max_tokens=4, repetition_penalty=1.2))
    assert s.schedule_ahead(s.schedule()) is None, "penalties need the pending token on the host"
    s = make_scheduler(chunk=4)
    s.add(make_request("a", list(range(3, 13)), max_tokens=4))
    assert s.schedule_ahead(s.schedule()) is None, "a prefill chunk that does not sample"


# ---- the engine loop, with the fake runner -------------------------------------------------------

def _config(tiny_llama, overlap):
    return tiny_engine_config(tiny_llama, overlap_schedule=overlap)


async def _tokens(engine, prompt, params):
    outs = [o async for o in engine.generate(prompt, params)]
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


def test_overlap_schedule_is_checked():
    with pytest.raises(ConfigError, match="overlap_schedule"):
        tiny_engine_config("unused", overlap_schedule="yes")


async def test_the_engine_gives_the_same_streams_with_and_without_steps_ahead(tiny_llama):
    params = [SamplingParams(max_tokens=3 + 5 * i, temperature=0) for i in range(4)] + \
             [SamplingParams(max_tokens=12, temperature=0.9, seed=7 + i) for i in range(3)]
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(len(params))]
    results = {}
    for overlap in ("off", "on"):
        make = fake_runner.factory()
        async with Engine(_config(tiny_llama, overlap), runner_factory=make) as engine:
            streams = (_tokens(engine, p, sp) for p, sp in zip(prompts, params))
            results[overlap] = await asyncio.gather(*streams)
            ahead = [row for b in make.made[-1].batches for row in b.decode_rows if row.pending_row >= 0]
            assert bool(ahead) == (overlap == "on")
            assert not engine.scheduler.has_work
    assert results["on"] == results["off"]
    assert [len(t) for t, _ in results["on"]] == [sp.max_tokens for sp in params]


async def test_abort_with_a_step_ahead_in_flight_loses_nothing_of_the_others(tiny_llama):
    aborted = asyncio.Event()
    async with Engine(_config(tiny_llama, "on"), runner_factory=fake_runner.factory()) as engine:
        prompt_ids = engine.tokenizer.encode("Hello world")
        greedy = SamplingParams(max_tokens=24, temperature=0)

        async def victim():
            tokens = []
            async for out in engine.generate("Hello world", greedy, request_id="victim"):
                tokens += out.token_ids
                if len(tokens) >= 5 and not aborted.is_set():
                    assert engine.abort("victim")  # a step built ahead holds its next row
                    aborted.set()
                if out.finished:
                    return tokens, out.finish_reason

        (victim_tokens, reason), *others = await asyncio.gather(
            victim(), *(_tokens(engine, "Hello world", greedy) for _ in range(3)))
        expected = fake_runner.fake_greedy(prompt_ids, 24, engine.runner.vocab_size)
        assert reason is FinishReason.ABORT and victim_tokens == expected[:len(victim_tokens)]
        assert all(tokens == expected and why is FinishReason.LENGTH for tokens, why in others)
        s = engine.scheduler
        assert not s.has_work and s.allocator.num_used_pages == s.prefix_cache.num_cached_pages


async def test_restart_with_steps_ahead_then_the_same_output(tiny_llama):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    async with Engine(_config(tiny_llama, "on"), runner_factory=fake_runner.factory()) as engine:
        before = await _tokens(engine, "Hello world", greedy)
        stream = engine.generate("Hello world", SamplingParams(max_tokens=200, temperature=0))
        async for out in stream:
            if len(out.token_ids):
                break
        await engine.restart()
        rest = [o async for o in stream]
        assert rest[-1].finish_reason is FinishReason.ERROR and "restarting" in rest[-1].error
        assert engine.is_ready and await _tokens(engine, "Hello world", greedy) == before


# ---- the real runner ------------------------------------------------------------------------------

async def test_the_real_runner_gives_the_same_tokens_one_step_ahead(tiny_llama):
    params = [SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=10, temperature=0),
              SamplingParams(max_tokens=10, temperature=1.0, seed=3),
              SamplingParams(max_tokens=6, temperature=0, logprobs=2)]
    prompts = ["Hello world", "The quick brown fox", "Once upon a time", "1 2 3 4"]
    results = {}
    for overlap in ("off", "on"):
        async with Engine(_config(tiny_llama, overlap)) as engine:
            launch, pending = engine.runner.launch, []

            def counting_launch(batch, prev):
                pending.extend(row for row in batch.decode_rows if row.pending_row >= 0)
                return launch(batch, prev)

            engine.runner.launch = counting_launch

            async def one(prompt, sp):
                outs = [o async for o in engine.generate(prompt, sp)]
                logprobs = [lp.logprob for o in outs for lp in (o.logprobs or [])]
                return [t for o in outs for t in o.token_ids], np.round(logprobs, 4).tolist()
            results[overlap] = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))
            assert bool(pending) == (overlap == "on")
    assert results["on"] == results["off"]
    assert all(len(tokens) == sp.max_tokens for (tokens, _), sp in zip(results["on"], params))


async def test_injected_faults_with_steps_ahead(tiny_llama):
    """A refused row and a non-finite row each fail their own request alone, with steps built ahead in
    flight; then a failing step fails the engine with an explicit error for every stream."""
    from kvloom.engine.faults import FaultInjector

    faults = FaultInjector()
    greedy = SamplingParams(max_tokens=20, temperature=0)
    make = fake_runner.factory()
    async with Engine(_config(tiny_llama, "on"), runner_factory=make, faults=faults) as engine:
        faults.arm("fail_request", after_steps=4, request_id="refused")
        faults.arm("nan_request", after_steps=6, request_id="nan")
        streams = (_tokens_of(engine, rid, greedy) for rid in ("refused", "nan", "a", "b"))
        (refused, why_refused), (nan, why_nan), *others = await asyncio.gather(*streams)
        prompt = engine.tokenizer.encode("Hello world")
        expected = fake_runner.fake_greedy(prompt, 20, engine.runner.vocab_size)
        for tokens, why in ((refused, why_refused), (nan, why_nan)):
            assert why is FinishReason.ERROR and tokens == expected[:len(tokens)] and tokens != expected
        assert others == [(expected, FinishReason.LENGTH)] * 2
        assert any(row.pending_row >= 0 for b in make.made[-1].batches for row in b.decode_rows)
        faults.arm("raise", after_steps=3)
        failed = await asyncio.gather(*(_tokens_of(engine, f"r{i}", greedy) for i in range(3)))
        assert all(why is FinishReason.ERROR for _, why in failed) and not engine.is_ready


async def _tokens_of(engine, request_id, params):
    outs = [o async for o in engine.generate("Hello world", params, request_id=request_id)]
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason


async def test_a_hung_step_ahead_trips_the_watchdog(tiny_llama):
    """A launch that never returns (a hung device) fails the engine after step_timeout_s, as a step does."""
    from kvloom.engine.faults import FaultInjector

    faults = FaultInjector()
    config = tiny_engine_config(tiny_llama, overlap_schedule="on", step_timeout_s=1.0)
    engine = Engine(config, runner_factory=fake_runner.factory(), faults=faults)
    try:
        await engine.start()
        faults.arm("hang", after_steps=3)
        tokens, why = await _tokens_of(engine, "hung", SamplingParams(max_tokens=20, temperature=0))
        assert why is FinishReason.ERROR and len(tokens) < 20 and not engine.is_ready
        assert "watchdog" in engine.state_detail
    finally:
        faults.clear()  # the hung launch returns; its thread exits
        await engine.stop()
    assert engine.join_compute_thread(10)
