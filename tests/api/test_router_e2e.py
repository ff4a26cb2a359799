"""The router end to end with real `kvloom serve` subprocesses on the tiny model:
`kvloom router --launch 2` as a user runs it (official openai client, decision headers, children
stopped with the router), and a replica killed mid-load and brought back."""

import asyncio
import os
import signal
import sys

import aiohttp
import openai
import orjson
import pytest

from kvloom.api.router_membership import HealthConfig, ReplicaState
from tests.api.test_serve_cli import free_port
from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(900)

TINY_SERVE_FLAGS = ["--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
                    "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2",
                    "--compile-cache", _JAX_CACHE]
KVLOOM = os.path.join(os.path.dirname(sys.executable), "kvloom")


async def wait_http(url: str, path: str, accept, timeout: float = 600.0) -> dict:
    """Until GET url+path answers a body that accept(status, body) takes (checked every 0.1 s)."""
    async def poll():
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + path) as r:
                        body = await r.json()
                        if accept(r.status, body):
                            return body
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
    return await asyncio.wait_for(poll(), timeout)


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_router_launch_serves_the_openai_surface_and_stops_its_replicas(tiny_llama):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        KVLOOM, "router", "--launch", "2", "--model", tiny_llama, "--port", str(port),
        "--health-interval", "0.2", "--health-timeout", "10", "--", *TINY_SERVE_FLAGS)
    url = f"http://127.0.0.1:{port}"
    children = []
    try:
        status = await wait_http(url, "/status", lambda s, b: len(b.get("replicas", [])) == 2 and all(
            r["state"] == "ready" and r["index"]["kind"] == "exact" and r["index"]["page_size"]
            for r in b["replicas"]))
        children = child_pids(proc.pid)
        assert len(children) == 2
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        system = "You are a careful assistant. " * 6  # well within the tiny model's 256 tokens
        answers = []
        for question in ("first question", "second question", "third question"):
            raw = await client.chat.completions.with_raw_response.create(
                model="llama", max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
            answers.append((raw.headers["x-kvloom-replica"],
                            int(raw.headers["x-kvloom-cached-tokens-predicted"]), raw.parse()))
            await wait_http(url, "/status", lambda s, b: all(
                r["index"]["last_event_id"] >= 2 for r in b["replicas"]), timeout=30)
        replicas = {r["url"] for r in status["replicas"]}
        assert answers[0][0] in replicas and answers[1][0] == answers[2][0] == answers[0][0]
        assert answers[1][1] > 0 and answers[2][1] > 0  # the shared system prompt is predicted cached
        assert answers[2][2].usage.prompt_tokens_details.cached_tokens >= answers[2][1]
        stream = await client.completions.create(model="llama", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        assert len(texts) >= 2  # passed through chunk by chunk
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/metrics") as r:
                metrics = await r.text()
        assert "kvloom_router_selections_total" in metrics and "kvloom_router_decision_seconds" in metrics
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 90) == 0
        assert not [pid for pid in children if is_alive(pid)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def start_replica(model: str, port: int):
    return await asyncio.create_subprocess_exec(
        KVLOOM, "serve", "--model", model, "--port", str(port), *TINY_SERVE_FLAGS,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def stream_one(session, url, i) -> str:
    """'ok' (finished), 'error' (an explicit error event, then [DONE]) or 'status:N'; never a cut stream."""
    body = {"prompt": [5 + i, 6, 7], "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return f"status:{resp.status}"
        outcome = None
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                assert outcome is not None, "[DONE] without a finish or an error"
                return outcome
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    outcome = "error"
                elif chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    outcome = "ok"
        raise AssertionError("the stream ended without [DONE]")


async def test_a_replica_killed_mid_load_is_marked_down_and_comes_back(tiny_llama, fleet):
    ports = [free_port(), free_port()]
    procs = [await start_replica(tiny_llama, p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        health = HealthConfig(interval_s=0.1, timeout_s=10.0, fall=2, rise=2, measure_rates=False)
        router, url = await fleet.router(urls, policy="least_load", health=health)
        await router.wait_for(lambda: len(router.membership.routable()) == 2, timeout=600)
        victim = router.membership.replicas[urls[1]]
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.ensure_future(stream_one(session, url, i)) for i in range(12)]
            await asyncio.wait_for(_until(lambda: victim.num_decoding >= 1), 60)
            procs[1].kill()  # mid-stream, no goodbye
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert set(results) <= {"ok", "error"}, results
            assert "error" in results  # the victim's streams ended with an explicit error event
            await router.wait_for(lambda: victim.state is ReplicaState.DOWN)
            assert victim.num_in_flight == 0
            await procs[1].wait()
            procs[1] = await start_replica(tiny_llama, ports[1])
            await router.wait_for(lambda: victim.is_routable, timeout=600)
            seen = set()
            for i in range(4):
                body = {"prompt": [9, i], "max_tokens": 2}
                async with session.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    seen.add(r.headers["X-Kvloom-Replica"])
            assert urls[1] in seen
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.005)
