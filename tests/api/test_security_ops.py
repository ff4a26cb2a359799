"""Operations over a real server on loopback (fake runner): the API key with the official openai client,
served model names and aliases, and one access-log line per request, rejected ones included."""

import logging

import aiohttp
import openai
import pytest
import pytest_asyncio

from kvloom.engine.engine import Engine
from tests import fake_runner
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(180)

KEY = "sk-test-0123456789"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest_asyncio.fixture
async def keyed_server(tiny_llama):
    """A server that needs KEY and answers to two names, "main" (reported) and "alias"."""
    config = tiny_engine_config(tiny_llama, served_model_names=("main", "alias"))
    engine = Engine(config, runner_factory=fake_runner.factory())
    served, cleanup = await serve_engine(engine, api_key=KEY)
    yield served
    await cleanup()


def client(served, key) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.api, api_key=key, max_retries=0)


async def test_wrong_key_is_an_authentication_error(keyed_server):
    async with client(keyed_server, "sk-wrong") as c:
        with pytest.raises(openai.AuthenticationError) as info:
            await c.chat.completions.create(model="main", messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
        with pytest.raises(openai.AuthenticationError):  # a key that is a prefix of the right one
            await openai.AsyncOpenAI(base_url=keyed_server.api, api_key=KEY[:-1], max_retries=0).models.list()


async def test_missing_key_gets_401_in_the_envelope_and_probes_stay_open(keyed_server):
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/score"),
                             ("GET", "/status"), ("GET", "/v1/no-such-route")):
            async with s.request(method, keyed_server.url + path, json={}) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"] == "Bearer"
                body = await r.json()
                assert body == {"error": {"message": body["error"]["message"],
                                          "type": "invalid_request_error", "param": None,
                                          "code": "invalid_api_key"}}
                assert "Authorization: Bearer" in body["error"]["message"]
        async with s.get(keyed_server.api + "/models", headers={"Authorization": f"Basic {KEY}"}) as r:
            assert r.status == 401
        for path in ("/health", "/ready", "/metrics"):
            async with s.get(keyed_server.url + path) as r:
                assert r.status == 200, path


async def test_right_key_and_served_names(keyed_server):
    engine = keyed_server.engine
    async with client(keyed_server, KEY) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == ["main", "alias"]
        for name in ("main", "alias"):
            chat = await c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3, temperature=0)
            assert chat.model == "main"
            prompt_ids = engine.tokenizer.apply_chat_template(MESSAGES)
            want = fake_runner.fake_greedy(prompt_ids, 3, engine.runner.vocab_size)
            assert chat.choices[0].message.content == engine.tokenizer.decode(want)
        assert (await c.models.retrieve("alias")).id == "alias"
        with pytest.raises(openai.NotFoundError):  # the model's own name is not served once names are given
            await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=2)
    async with aiohttp.ClientSession() as s:
        async with s.get(keyed_server.url + "/metrics") as r:
            assert 'vllm:generation_tokens_total{model_name="main"}' in await r.text()


def access_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "kvloom.access"]


async def test_access_log_has_one_line_per_request(keyed_server, caplog):
    caplog.set_level(logging.INFO, logger="kvloom.access")
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        body = {"model": "alias", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        async with s.post(keyed_server.api + "/chat/completions", json=body,
                          headers={**auth, "X-Request-Id": "client-id-1"}) as r:
            assert r.status == 200 and r.headers["X-Request-Id"] == "client-id-1"
            await r.read()
        async with s.post(keyed_server.api + "/chat/completions", json={"messages": []}, headers=auth) as r:
            assert r.status == 400
            generated_id = r.headers["X-Request-Id"]
        async with s.get(keyed_server.api + "/models") as r:
            assert r.status == 401
        bad_id = {**auth, "X-Request-Id": "bad id\twith tabs"}
        async with s.get(keyed_server.url + "/nowhere", headers=bad_id) as r:
            assert r.status == 404 and r.headers["X-Request-Id"] != "bad id\twith tabs"
        async with s.get(keyed_server.url + "/health") as r:
            assert r.status == 200
    lines = access_records(caplog)
    assert len(lines) == 5, lines
    expected = [("POST", "/v1/chat/completions", "200"), ("POST", "/v1/chat/completions", "400"),
                ("GET", "/v1/models", "401"), ("GET", "/nowhere", "404"), ("GET", "/health", "200")]
    for line, (method, path, status) in zip(lines, expected):
        fields = line.split()
        assert fields[:3] == [method, path, status], line
        assert fields[3].endswith("ms") and float(fields[3][:-2]) >= 0
        assert fields[4].startswith("request_id=") and len(fields[4]) > len("request_id=")
    assert lines[0].endswith("request_id=client-id-1")
    assert lines[1].endswith(f"request_id={generated_id}")


async def test_access_log_can_be_turned_off(tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="kvloom.access")
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=fake_runner.factory())
    served, cleanup = await serve_engine(engine, access_log=False)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(served.api + "/models") as r:
                assert r.status == 200 and r.headers["X-Request-Id"]
    finally:
        await cleanup()
    assert access_records(caplog) == []
