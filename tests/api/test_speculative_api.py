"""Speculative decoding behind the HTTP API: streamed chat completions with n > 1 and a stop string give
the same choices, finish reasons and usage with `--speculative ngram` as without (fake looping runner)."""

import aiohttp
import orjson
import pytest

from kvloom.engine.config import SpeculativeConfig
from kvloom.engine.engine import Engine
from tests import fake_runner
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(60)


async def stream_choices(url: str, body: dict) -> tuple[dict, dict, object]:
    """choice index -> its streamed content, choice index -> its finish reason, and the usage."""
    content, finish, usage = {}, {}, None
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    i = choice["index"]
                    content[i] = content.get(i, "") + (choice["delta"].get("content") or "")
                    finish[i] = choice.get("finish_reason") or finish.get(i)
    return content, finish, usage


async def test_streamed_choices_are_the_same_with_speculation(tiny_llama):
    body = dict(model="llama", messages=[{"role": "user", "content": "!\"#$%!\"#$%!\"#$%"}], max_tokens=40,
                temperature=0, n=2, stream=True, stream_options={"include_usage": True})
    results = {}
    for name, spec in (("plain", SpeculativeConfig()), ("ngram", SpeculativeConfig(method="ngram"))):
        factory = fake_runner.factory(next_token=fake_runner.looping_next_token)
        served, cleanup = await serve_engine(Engine(tiny_engine_config(tiny_llama, speculative=spec),
                                                    runner_factory=factory))
        try:
            free, _, _ = await stream_choices(served.url, body)
            stop = max((free[0][i:i + 3] for i in range(len(free[0]) - 2)), key=free[0].index)
            results[name] = [await stream_choices(served.url, body),
                             await stream_choices(served.url, dict(body, stop=[stop]))]
            accepted = served.engine.spec_stats.num_accepted_tokens
        finally:
            await cleanup()
    assert results["plain"] == results["ngram"]
    (content, finish, usage), (stopped, stop_finish, _) = results["ngram"]
    assert content[0] == content[1] and finish == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 80
    assert stop_finish == {0: "stop", 1: "stop"} and len(stopped[0]) < len(content[0])
    assert accepted > 0
