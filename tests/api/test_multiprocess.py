"""Two `kvloom serve` processes on loopback serve one tiny model split over both (jax.distributed, CPU
collectives): process 0 answers like a single process (transformers' greedy tokens), /status shows the
mesh over both; when the follower is killed, the engine fails explicitly (503 engine_unavailable)."""

import asyncio
import os
import socket
import sys

import aiohttp
import pytest
import torch

from tests import tiny_models
from tests.api.test_serve_cli import free_port, wait_ready
from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(420)

PROMPTS = [[5, 6, 7, 8], list(range(40, 60))]
NUM_TOKENS = 10


def free_port_pair() -> int:
    """A free port whose successor is free too (the coordinator, and process 0's step channel)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def hf_greedy_text(path):
    from transformers import AutoTokenizer

    hf, tokenizer = tiny_models.load_hf(path), AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([p])
            gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(tokenizer.decode(gen[0, len(p):].tolist(), skip_special_tokens=True))
    return out


async def start(process_id: int, model: str, port: int, coordinator: int):
    kvloom = os.path.join(os.path.dirname(sys.executable), "kvloom")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    return await asyncio.create_subprocess_exec(
        kvloom, "serve", "--model", model, "--port", str(port), "--max-running", "2",
        "--max-model-len", "256", "--page-size", "4", "--num-pages", "512", "--chunk-size", "32",
        "--max-tokens-per-step", "64",
        "--max-prefill-seqs", "1", "--no-warmup", "--compile-cache", _JAX_CACHE, "--step-timeout", "60",
        "--tensor-parallel-size", "2", "--num-processes", "2", "--process-id", str(process_id),
        "--coordinator", f"127.0.0.1:{coordinator}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def complete(session, url, prompt):
    body = {"model": "llama", "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0,
            "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


async def test_two_processes_serve_as_one_and_a_dead_follower_fails_the_engine(tiny_llama):
    expected = hf_greedy_text(tiny_llama)
    port, coordinator = free_port(), free_port_pair()
    leader = await start(0, tiny_llama, port, coordinator)
    follower = await start(1, tiny_llama, port, coordinator)
    url, output = f"http://127.0.0.1:{port}", []
    follower_log = asyncio.create_task(follower.stdout.read())
    try:
        await asyncio.wait_for(wait_ready(leader, output), 300)
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*[complete(session, url, p) for p in PROMPTS])
            for (status, body), want in zip(results, expected):
                assert status == 200, body
                assert body["usage"]["completion_tokens"] == NUM_TOKENS
                assert body["choices"][0]["text"] == want
            async with session.get(url + "/status") as r:
                mesh = (await r.json())["parallel"]
            assert mesh["num_processes"] == 2 and mesh["tensor_parallel_size"] == 2
            assert mesh["kv_heads_per_device"] == 1 and mesh["kv_pages_per_device"] == 512

            follower.kill()
            await follower.wait()
            status, body = await complete(session, url, PROMPTS[0])
            assert status == 503 and body["error"]["code"] == "engine_unavailable", body
            async with session.get(url + "/status") as r:
                detail = (await r.json())["state_detail"]
            assert "process 1" in detail, detail
    finally:
        for proc in (follower, leader):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        follower_log.cancel()
