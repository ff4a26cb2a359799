"""The official openai client against a real server on loopback (fake runner: outputs computable by hand)."""

import asyncio

import aiohttp
import openai
import pytest

from tests import fake_runner

pytestmark = pytest.mark.timeout(60)


def client(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0)


def expected_text(engine, prompt_ids, n):
    ids = fake_runner.fake_greedy(prompt_ids, n, engine.runner.vocab_size)
    return engine.tokenizer.decode(ids)


async def test_chat_and_completions(fake_server):
    engine = fake_server.engine
    messages = [{"role": "user", "content": "Hello there"}]
    prompt_ids = engine.tokenizer.apply_chat_template(messages)
    async with client(fake_server) as c:
        chat = await c.chat.completions.create(model="llama", messages=messages, max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == expected_text(engine, prompt_ids, 6)
        assert chat.choices[0].finish_reason == "length" and chat.object == "chat.completion"
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt_ids), 6)

        comp = await c.completions.create(model="llama", prompt=["Hello world", "The quick"], max_tokens=4,
                                          temperature=0)
        for i, text in enumerate(["Hello world", "The quick"]):
            assert comp.choices[i].index == i
            assert comp.choices[i].text == expected_text(engine, engine.tokenizer.encode(text), 4)
        assert comp.usage.completion_tokens == 8

        ids = await c.completions.create(model="llama", prompt=[5, 6, 7], max_tokens=3, temperature=0)
        assert ids.choices[0].text == expected_text(engine, [5, 6, 7], 3)


async def test_streaming_with_usage(fake_server):
    engine = fake_server.engine
    messages = [{"role": "user", "content": "Stream please"}]
    prompt_ids = engine.tokenizer.apply_chat_template(messages)
    async with client(fake_server) as c:
        stream = await c.chat.completions.create(model="llama", messages=messages, max_tokens=7,
                                                 temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == expected_text(engine, prompt_ids, 7)
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
        assert chunks[-1].usage.prompt_tokens == len(prompt_ids)

        stream = await c.completions.create(model="llama", prompt="Hello", max_tokens=5, temperature=0,
                                            stream=True)
        text = "".join([ch.choices[0].text async for ch in stream])
        assert text == expected_text(engine, engine.tokenizer.encode("Hello"), 5)


async def test_n_choices_and_seeds(fake_server):
    async with client(fake_server) as c:
        greedy = await c.completions.create(model="llama", prompt="Hello", max_tokens=4, temperature=0, n=3)
        assert len({ch.text for ch in greedy.choices}) == 1
        assert [ch.index for ch in greedy.choices] == [0, 1, 2]
        sampled = await c.completions.create(model="llama", prompt="Hello", max_tokens=4, temperature=1.0,
                                             n=3,
                                             seed=11)
        again = await c.completions.create(model="llama", prompt="Hello", max_tokens=4, temperature=1.0, n=3,
                                           seed=11)
        assert [ch.text for ch in sampled.choices] == [ch.text for ch in again.choices]
        assert len({ch.text for ch in sampled.choices}) > 1  # each choice has its own seed
        assert sampled.usage.completion_tokens == 12
        stream = await c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=3, temperature=0, n=2, stream=True)
        per_choice = {}
        async for ch in stream:
            for choice in ch.choices:
                per_choice[choice.index] = per_choice.get(choice.index, "") + (choice.delta.content or "")
        assert sorted(per_choice) == [0, 1] and per_choice[0] == per_choice[1]


async def test_stop_strings(fake_server):
    engine = fake_server.engine
    full = expected_text(engine, engine.tokenizer.encode("Hello"), 10)
    stop = full[3:5]
    async with client(fake_server) as c:
        out = await c.completions.create(model="llama", prompt="Hello", max_tokens=10, temperature=0,
                                         stop=[stop])
        assert out.choices[0].text == full[:full.index(stop)]
        assert out.choices[0].finish_reason == "stop"


async def test_logprobs(fake_server):
    async with client(fake_server) as c:
        chat = await c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
        content = chat.choices[0].logprobs.content
        assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
        assert all(t.logprob == -0.5 for t in content)  # the fake runner's value
        comp = await c.completions.create(model="llama", prompt="Hello", max_tokens=3, temperature=0,
                                          logprobs=1)
        lp = comp.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
        assert "".join(lp.tokens) == comp.choices[0].text


async def test_models(fake_server):
    async with client(fake_server) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == ["llama"]
        assert (await c.models.retrieve("llama")).id == "llama"
        with pytest.raises(openai.NotFoundError) as err:
            await c.models.retrieve("other")
        assert err.value.body["code"] == "model_not_found"


async def test_disconnect_mid_stream_aborts_and_frees_pages(fake_server):
    scheduler = fake_server.engine.scheduler
    body = {"model": "llama", "prompt": "Hello world", "max_tokens": 200, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(fake_server.url + "/v1/completions", json=body)
        assert resp.status == 200
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                seen += 1
            if seen == 3:
                break
        assert scheduler.has_work
        resp.close()  # the client goes away halfway

    async def freed():
        while scheduler.has_work:
            await asyncio.sleep(0)

    await asyncio.wait_for(freed(), 10)
    assert scheduler.allocator.num_used_pages == scheduler.prefix_cache.num_cached_pages


async def test_health_status_metrics(fake_server):
    async with aiohttp.ClientSession() as s, client(fake_server) as c:
        await c.completions.create(model="llama", prompt="Hello", max_tokens=2, temperature=0)
        async with s.get(fake_server.url + "/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with s.get(fake_server.url + "/ready") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with s.get(fake_server.url + "/status") as r:
            status = await r.json()
        for key in ("state", "state_detail", "ready", "last_ready_at", "uptime_s", "model", "config",
                    "num_running", "num_waiting", "kv_cache_usage", "prefix_cache_hit_rate"):
            assert key in status
        assert status["state"] == "ready" and status["model"] == "llama"
        async with s.get(fake_server.url + "/metrics") as r:
            text = await r.text()
        for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds",
                     "vllm:e2e_request_latency_seconds", 'vllm:num_requests_running{model_name="llama"}',
                     "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
                     "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total",
                     'vllm:request_success_total{finished_reason="length",model_name="llama"}'):
            assert name in text, name
        async with s.post(fake_server.url + "/v1/completions", json={"prompt": "x", "temperature": 9}) as r:
            assert r.status == 400
        async with s.get(fake_server.url + "/metrics") as r:
            errors = 'kvloom_request_errors_total{error_type="invalid_value",model_name="llama"}'
            assert errors in await r.text()
        async with s.get(fake_server.url + "/openapi.json") as r:
            spec = await r.json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/score", "/health", "/ready"} \
            <= set(spec["paths"])
