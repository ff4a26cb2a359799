"""Readiness gating: while warm-up is held open, /ready says 503 and work is refused at once."""

import asyncio

import aiohttp
import pytest

from kvloom.engine.engine import Engine, EngineState
from tests import fake_runner
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(60)


async def test_ready_only_after_warm_up(tiny_llama):
    gate = asyncio.Event()
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=fake_runner.factory(), warmup_gate=gate)
    served, cleanup = await serve_engine(engine, start=False)
    start = asyncio.ensure_future(engine.start())
    try:
        async with aiohttp.ClientSession() as s:
            async def state_is_warming():
                while engine.state is not EngineState.WARMING:
                    await asyncio.sleep(0)
            await asyncio.wait_for(state_is_warming(), 10)

            async with s.get(served.url + "/ready") as r:
                assert r.status == 503
                body = await r.json()
                assert body["ready"] is False and body["state"] == "warming"
            async with s.get(served.url + "/health") as r:
                assert r.status == 200
            for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("/v1/completions", {"prompt": "hi"})):
                async with s.post(served.url + path, json=body) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"]
                    err = (await r.json())["error"]
                    assert err["code"] == "engine_not_ready" and "warming" in err["message"]
            assert not engine.scheduler.has_work  # nothing queued behind a cold engine

            gate.set()
            await start
            async with s.get(served.url + "/ready") as r:
                assert r.status == 200 and (await r.json())["state"] == "ready"
            async with s.get(served.url + "/status") as r:  # the start's phases, the time held among them
                phases = (await r.json())["start"]["phases"]
                assert list(phases) == ["load_model", "tokenizer", "held", "warmup", "round_trip"]
            async with s.post(served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
                assert (await r.json())["usage"]["completion_tokens"] == 2
    finally:
        gate.set()
        await start
        await cleanup()


async def test_stopped_engine_is_unavailable(tiny_llama):
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=fake_runner.factory())
    served, cleanup = await serve_engine(engine)
    await engine.stop()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(served.url + "/v1/completions", json={"prompt": "hi"}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "engine_unavailable"
            async with s.get(served.url + "/health") as r:
                assert r.status == 503
            async with s.get(served.url + "/ready") as r:
                assert r.status == 503
    finally:
        await cleanup()
