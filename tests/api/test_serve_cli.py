"""`kvloom serve` as a user runs it: a subprocess on a free port; SIGTERM drains the in-flight stream,
then the process exits on its own."""

import asyncio
import os
import signal
import socket
import sys

import aiohttp
import orjson
import pytest

from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(proc, output: list) -> None:
    """Read the server's stdout into `output` until it says the engine is READY."""
    while True:
        line = (await proc.stdout.readline()).decode()
        assert line, f"the server exited during start-up: {''.join(output)}"
        output.append(line)
        if line.startswith("kvloom: ready"):
            return


async def test_sigterm_drains_then_exits(tiny_llama):
    port = free_port()
    kvloom = os.path.join(os.path.dirname(sys.executable), "kvloom")
    proc = await asyncio.create_subprocess_exec(
        kvloom, "serve", "--model", tiny_llama, "--port", str(port), "--max-running", "4", "--max-model-len", "256",
        "--page-size", "4", "--num-pages", "512", "--chunk-size", "32", "--max-tokens-per-step", "64",
        "--max-prefill-seqs", "2", "--compile-cache", _JAX_CACHE, "--drain-timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    output = []
    try:
        await asyncio.wait_for(wait_ready(proc, output), 180)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/ready") as r:
                assert r.status == 200
            body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                usage, signalled = None, False
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunk = orjson.loads(line[6:])
                        assert "error" not in chunk, chunk
                        usage = chunk.get("usage") or usage
                        if not signalled:
                            proc.send_signal(signal.SIGTERM)  # mid-stream: the server drains this request
                            signalled = True
                    if line.startswith(b"data: [DONE]"):
                        break
        assert usage["completion_tokens"] == 60
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        output.append((await proc.stdout.read()).decode())
        assert "kvloom: draining" in "".join(output)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
