"""The engine loop, streaming, aborts, readiness and hermeticity, driven by the deterministic fake runner."""

import asyncio
import gc
import json
import os
import threading

import pytest

from kvloom.engine.engine import (Engine, EngineNotReadyError, EngineState, EngineUnavailableError,
                                  QueueFullError)
from kvloom.engine.request import FinishReason, SamplingParams
from tests import fake_runner
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(60)


async def wait_for(predicate, timeout=10.0):
    """Wait until predicate() is true, yielding to the loop in between (no fixed sleeps)."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0)
    await asyncio.wait_for(poll(), timeout)


@pytest.fixture
def config(tiny_llama):
    return tiny_engine_config(tiny_llama)


async def collect(engine, prompt, params, **kw):
    outs = [o async for o in engine.generate(prompt, params, **kw)]
    return outs, "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]


async def test_generate_streams_deltas_and_usage(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        assert engine.state is EngineState.READY
        prompt_ids = engine.tokenizer.encode("Hello world")
        outs, text, ids = await collect(engine, "Hello world", SamplingParams(max_tokens=7, temperature=0))
        expected = fake_runner.fake_greedy(prompt_ids, 7, engine.runner.vocab_size)
        assert ids == expected
        assert text == engine.tokenizer.decode(expected)
        assert len(outs) == 7 and all(len(o.token_ids) == 1 for o in outs)
        last = outs[-1]
        assert last.finished and last.finish_reason is FinishReason.LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), 7)
        assert not any(o.finished for o in outs[:-1])


async def test_chat_messages_use_the_template(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        messages = [{"role": "user", "content": "Hi there"}]
        outs, _, ids = await collect(engine, None, SamplingParams(max_tokens=3, temperature=0),
                                     messages=messages)
        prompt = engine.tokenizer.apply_chat_template(messages)
        assert outs[-1].usage.prompt_tokens == len(prompt)
        assert ids == fake_runner.fake_greedy(prompt, 3, engine.runner.vocab_size)


async def test_break_aborts_and_frees_pages(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        scheduler = engine.scheduler
        gen = engine.generate("The quick brown fox", SamplingParams(max_tokens=200, temperature=0))
        async for out in gen:
            if len(scheduler.running) and out.token_ids:
                break
        await gen.aclose()
        assert not scheduler.has_work
        assert scheduler.allocator.num_used_pages == scheduler.prefix_cache.num_cached_pages


async def test_cancelling_the_consumer_aborts(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        got_one = asyncio.Event()

        async def consume():
            async for _ in engine.generate("Hello", SamplingParams(max_tokens=200, temperature=0)):
                got_one.set()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(got_one.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: not engine.scheduler.has_work)
        s = engine.scheduler
        assert s.allocator.num_used_pages == s.prefix_cache.num_cached_pages


async def test_stop_string_across_token_boundaries(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        prompt_ids = engine.tokenizer.encode("Hello world")
        full = fake_runner.fake_greedy(prompt_ids, 12, engine.runner.vocab_size)
        text = engine.tokenizer.decode(full)
        pieces = [engine.tokenizer.decode(full[:i]) for i in range(len(full) + 1)]
        # a stop string that starts inside one token's text and ends inside a later one
        cut = next(i for i in range(2, len(full) - 2) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
        start = len(pieces[cut]) - 1
        stop = text[start:start + 3]
        outs, got, _ = await collect(engine, "Hello world",
                                     SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
        assert got == text[:text.index(stop)]
        assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop


async def test_invalid_input_names_the_field(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        cases = [
            ("", SamplingParams(), "prompt: must not be empty"),
            ([1, 2, 10**6], SamplingParams(), r"prompt\[2\]: token id 1000000 is outside"),
            ([], SamplingParams(), "prompt: must not be empty"),
            ([3] * 300, SamplingParams(), "prompt: 300 tokens is at or over the context length 256"),
            ([3] * 200, SamplingParams(max_tokens=100), "max_tokens: 100 does not fit"),
        ]
        for prompt, params, message in cases:
            with pytest.raises(ValueError, match=message):
                engine.generate(prompt, params)
        with pytest.raises(ValueError, match=r"messages\[0\].role"):
            engine.generate(messages=[{"role": "wizard", "content": "x"}])
        for field, value in [("temperature", -1), ("top_p", 0.0), ("top_k", -1), ("max_tokens", 0),
                             ("logprobs", 21), ("stop", [""]), ("seed", -5), ("min_p", 2)]:
            with pytest.raises(ValueError, match=f"^{field}"):
                SamplingParams(**{field: value})
        # the engine is unharmed
        _, _, ids = await collect(engine, "Hello", SamplingParams(max_tokens=2, temperature=0))
        assert len(ids) == 2


async def test_queue_full_is_explicit(config):
    config = tiny_engine_config(config.model, scheduler=dict(max_waiting=2))
    release, in_step = threading.Event(), threading.Event()

    def before_step(batch):
        if batch.rows[0].request_id != "warmup":
            in_step.set()
            release.wait(30)

    async with Engine(config, runner_factory=fake_runner.factory(before_step=before_step)) as engine:
        params = SamplingParams(max_tokens=2, temperature=0)
        first = asyncio.ensure_future(collect(engine, "Hello", params))
        await wait_for(in_step.is_set)
        queued = [engine.generate("Hello", params) for _ in range(2)]
        with pytest.raises(QueueFullError, match="queue is full"):
            engine.generate("Hello", params)
        release.set()
        results = await asyncio.gather(first, *[collect_stream(g) for g in queued])
        assert all(len(ids) == 2 for _, _, ids in results)


async def collect_stream(gen):
    outs = [o async for o in gen]
    return outs, "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]


async def test_not_ready_refuses_at_once_then_ready(config):
    gate = asyncio.Event()
    engine = Engine(config, runner_factory=fake_runner.factory(), warmup_gate=gate)
    start = asyncio.ensure_future(engine.start())
    await wait_for(lambda: engine.state is EngineState.WARMING)
    with pytest.raises(EngineNotReadyError, match="warming"):
        engine.generate("Hello", SamplingParams(max_tokens=2))
    gate.set()
    await start
    assert engine.state is EngineState.READY and engine.last_ready_at is not None
    _, _, ids = await collect(engine, "Hello", SamplingParams(max_tokens=2, temperature=0))
    assert len(ids) == 2
    await engine.stop()
    assert engine.state is EngineState.STOPPED
    with pytest.raises(EngineUnavailableError):
        engine.generate("Hello", SamplingParams(max_tokens=2))


async def test_loop_serves_while_a_step_runs(config):
    """The step blocks until the event loop has ticked five times: only a free loop lets it finish."""
    ticks = 0
    loop_ticked = threading.Event()

    def before_step(batch):
        if batch.rows[0].request_id != "warmup":
            assert loop_ticked.wait(10), "the event loop did not run while the step was in flight"

    async with Engine(config, runner_factory=fake_runner.factory(before_step=before_step)) as engine:
        async def ticker():
            nonlocal ticks
            while ticks < 5:
                ticks += 1
                await asyncio.sleep(0)
            loop_ticked.set()

        gen = collect(engine, "Hello", SamplingParams(max_tokens=3, temperature=0))
        (_, _, ids), _ = await asyncio.gather(gen, ticker())
        assert len(ids) == 3
        runner = engine.runner
        assert runner.step_thread is engine._compute.thread is not threading.current_thread()


async def test_stop_is_bounded_with_a_step_in_flight(config):
    release = threading.Event()
    in_step = threading.Event()

    def before_step(batch):
        if batch.rows[0].request_id != "warmup":
            in_step.set()
            release.wait(30)

    engine = Engine(config, runner_factory=fake_runner.factory(before_step=before_step))
    await engine.start()
    outs = []

    async def consume():
        async for o in engine.generate("Hello", SamplingParams(max_tokens=5)):
            outs.append(o)

    task = asyncio.ensure_future(consume())
    await wait_for(in_step.is_set)
    await asyncio.wait_for(engine.stop(timeout=0.5), 5)  # the step is still blocked: stop does not wait on it
    await asyncio.wait_for(task, 5)
    assert engine.state is EngineState.STOPPED
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR and "stopping" in outs[-1].error
    release.set()
    assert engine.join_compute_thread(10)


async def test_seeded_sampling_is_independent_of_the_batch(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        params = SamplingParams(max_tokens=6, temperature=0.8, seed=1234)
        _, _, alone = await collect(engine, "Hello", params)
        others = [collect(engine, "The quick brown fox", SamplingParams(max_tokens=6, temperature=1.0))
                  for _ in range(3)]
        results = await asyncio.gather(collect(engine, "Hello", params), *others)
        assert results[0][2] == alone


async def test_two_engines_at_once(config, tiny_checkpoints):
    other = tiny_engine_config(tiny_checkpoints("qwen3"))
    async with Engine(config, runner_factory=fake_runner.factory()) as a, \
            Engine(other, runner_factory=fake_runner.factory()) as b:
        params = SamplingParams(max_tokens=5, temperature=0)
        (_, _, ia), (_, _, ib) = await asyncio.gather(collect(a, [5, 6, 7], params),
                                                      collect(b, [5, 6, 7], params))
        assert ia == ib == fake_runner.fake_greedy([5, 6, 7], 5, a.runner.vocab_size)
        assert a.scheduler is not b.scheduler and a.metrics.registry is not b.metrics.registry


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_create_and_stop_twenty_times_leaks_nothing(config):
    async def cycle():
        engine = Engine(config, runner_factory=fake_runner.factory())
        async with engine:
            await collect(engine, "Hello", SamplingParams(max_tokens=2, temperature=0))
        assert engine.join_compute_thread(10)

    await cycle()
    gc.collect()
    threads, fds, rss = set(threading.enumerate()), _open_fds(), _rss_bytes()
    for _ in range(20):
        await cycle()
    gc.collect()
    # no thread the cycles started is left (one an earlier test left behind may end meanwhile)
    assert not set(threading.enumerate()) - threads
    assert _open_fds() <= fds + 2
    assert _rss_bytes() - rss < 50 * 2**20


async def test_start_phases_add_up_to_the_start(config):
    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        start = engine.status()["start"]
        phases = start["phases"]
        assert list(phases) == ["load_model", "tokenizer", "warmup", "round_trip"]
        assert all(seconds >= 0 for seconds in phases.values())
        assert sum(phases.values()) == pytest.approx(start["total_s"], abs=0.003)  # they partition the start
        assert start["detail"]["tokenizer_load_s"] > 0  # loaded beside the model: in the detail
        assert engine.start_summary() == (f"in {start['total_s']:.1f}s: "
                                          + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))


async def test_the_grammar_compiler_is_built_by_the_first_structured_request(config):
    from kvloom.engine.request import ResponseFormat

    async with Engine(config, runner_factory=fake_runner.factory()) as engine:
        assert engine.grammars is None  # not at start: requests without response_format never need it
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        params = SamplingParams(max_tokens=40, temperature=0,
                                response_format=ResponseFormat.json_schema(schema))
        outs, text, _ = await collect(engine, "Hi", params)
        assert outs[-1].finish_reason is FinishReason.STOP and isinstance(json.loads(text)["ok"], bool)
        assert engine.grammars is not None
        await wait_for(lambda: not any(t.name.startswith("kvloom-grammar") for t in threading.enumerate()))

        # a schema that does not compile: at the call, once the compiler is built
        bad = SamplingParams(max_tokens=4, response_format=ResponseFormat.json_schema({"type": "nonsense"}))
        with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema"):
            engine.generate("Hi", bad)
        assert not engine.scheduler.has_work
