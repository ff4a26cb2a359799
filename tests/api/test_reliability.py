"""Faults under concurrent streaming and non-streaming load on the tiny model: every request either
completes or gets an explicit error; a failed engine refuses at once; a restart brings it back."""

import asyncio

import aiohttp
import orjson
import pytest

from kvloom.engine.engine import Engine, EngineState
from kvloom.engine.faults import FaultInjector
from kvloom.engine.request import FinishReason, SamplingParams
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(180)

NUM_TOKENS = 24


async def wait_until(predicate, timeout=30.0):
    async def poll():
        while not predicate():
            await asyncio.sleep(0)
    await asyncio.wait_for(poll(), timeout)


async def one_request(session, url, i, stream):
    body = {"model": "llama", "prompt": [5 + i, 6, 7, 8], "max_tokens": NUM_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return f"error:{(await resp.json())['error']['code']}"
        if not stream:
            data = await resp.json()
            return "ok" if data["usage"]["completion_tokens"] == NUM_TOKENS else "short"
        completion_tokens, error = 0, None
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["code"]
                elif chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
            if line.startswith(b"data: [DONE]"):
                break
        return f"error:{error}" if error else ("ok" if completion_tokens == NUM_TOKENS else "short")


async def load(url, n=12, offset=0):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await asyncio.gather(*[one_request(session, url, offset + i, stream=bool(i % 2))
                                      for i in range(n)])


async def get_status(url, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize("kind", ["raise", "kill", "hang"])
async def test_fault_under_load_then_restart(tiny_llama, kind):
    faults = FaultInjector()
    config = tiny_engine_config(tiny_llama, step_timeout_s=2.0)
    served, cleanup = await serve_engine(Engine(config, faults=faults), enable_admin=True)
    try:
        faults.arm(kind, after_steps=30)  # mid-load: the first requests finish, the rest are cut
        outcomes = await load(served.url)
        assert set(outcomes) <= {"ok", "error:engine_unavailable"}, outcomes
        assert "error:engine_unavailable" in outcomes  # the fault fired mid-load
        assert served.engine.state is EngineState.FAILED
        counts = {o: outcomes.count(o) for o in set(outcomes)}
        print(f"{kind}: {counts}")

        after = await load(served.url, n=10, offset=100)  # no restart: 10 of 10 explicit errors, at once
        assert after == ["error:engine_unavailable"] * 10
        assert (await get_status(served.url, "/health"))[0] == 503
        status, ready = await get_status(served.url, "/ready")
        assert status == 503 and ready["state"] == "failed"
        _, detail = await get_status(served.url, "/status")
        assert detail["state"] == "failed" and detail["state_detail"]

        faults.clear()  # a hung step returns; its old thread exits
        async with aiohttp.ClientSession() as session:
            async with session.post(served.url + "/admin/restart") as resp:
                assert resp.status == 200 and (await resp.json())["state"] == "ready"
        assert await load(served.url, n=10, offset=200) == ["ok"] * 10
        assert served.engine.num_restarts == 1
    finally:
        faults.clear()
        await cleanup()


async def test_warm_up_failure_leaves_degraded_then_restart(tiny_llama):
    faults = FaultInjector()
    faults.arm("fail_warmup")
    engine = Engine(tiny_engine_config(tiny_llama), faults=faults)
    served, cleanup = await serve_engine(engine, enable_admin=True)
    try:
        assert engine.state is EngineState.DEGRADED
        status, body = await get_status(served.url, "/status")
        assert body["state"] == "degraded" and "injected warm-up failure" in body["state_detail"]
        assert (await get_status(served.url, "/ready"))[0] == 503
        assert await load(served.url, n=2) == ["error:engine_not_ready"] * 2
        await engine.restart()
        assert engine.state is EngineState.READY
        assert await load(served.url, n=2) == ["ok"] * 2
    finally:
        await cleanup()


async def test_one_bad_request_among_fifty_fails_alone(tiny_llama):
    faults = FaultInjector()
    async with Engine(tiny_engine_config(tiny_llama), faults=faults) as engine:
        faults.arm("fail_request", request_id="r17")
        faults.arm("nan_request", request_id="r33")

        async def run(i):
            outs = [o async for o in engine.generate([5 + i, 6, 7],
                                                     SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True),
                                                     request_id=f"r{i}")]
            return outs[-1]

        finals = await asyncio.gather(*[run(i) for i in range(50)])
        failed = {i for i, out in enumerate(finals) if out.finish_reason is FinishReason.ERROR}
        assert failed == {17, 33}
        assert "row" in finals[17].error and "non-finite" in finals[33].error
        assert finals[17].error_code == finals[33].error_code == "request_failed"
        assert all(out.usage.completion_tokens == 8 for i, out in enumerate(finals) if i not in failed)
        assert engine.state is EngineState.READY
        assert faults.num_fired == 2


async def test_automatic_restart_with_a_limit(tiny_llama):
    faults = FaultInjector()
    config = tiny_engine_config(tiny_llama, max_restarts=1, restart_backoff_s=0.01)
    async with Engine(config, faults=faults) as engine:
        faults.arm("raise")
        outs = [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4))]
        assert outs[-1].finish_reason is FinishReason.ERROR
        await wait_until(lambda: engine.state is EngineState.READY and engine.num_restarts == 1)
        ok = [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))]
        assert ok[-1].usage.completion_tokens == 4
        faults.arm("raise")
        outs = [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4))]
        assert outs[-1].finish_reason is FinishReason.ERROR
        assert engine.state is EngineState.FAILED  # the limit is reached: it stays failed
        assert engine._restart_task is None or engine._restart_task.done()


async def test_graceful_drain_then_stop(tiny_llama):
    engine = Engine(tiny_engine_config(tiny_llama))
    served, cleanup = await serve_engine(engine)
    try:
        in_flight = asyncio.ensure_future(load(served.url, n=4))
        await wait_until(lambda: engine.scheduler.num_running > 0)
        assert await engine.drain(30)  # in-flight requests finish...
        assert await in_flight == ["ok"] * 4
        assert await load(served.url, n=2,
                          offset=50) == ["error:engine_unavailable"] * 2  # ...new ones are refused
    finally:
        await cleanup()
    assert engine.state is EngineState.STOPPED and engine.join_compute_thread(10)
