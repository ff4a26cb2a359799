"""The field policy (api/FIELDS.md) against a real server (fake runner): the page, /openapi.json and
the fields the server accepts are the same sets; benchmark clients' exact request shapes work (guidellm
streams with continuous usage); no-effect fields change nothing; the text-shaping extensions; the
tokenizer endpoints."""

from __future__ import annotations

import os
import re

import aiohttp
import orjson
import pytest

from tests import fake_runner

pytestmark = pytest.mark.timeout(60)

FIELDS_MD = os.path.join(os.path.dirname(__file__), "..", "..", "api", "FIELDS.md")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hello there"}]
# Fields other servers take that kvloom does not: each must be refused as unknown, never ignored.
FOREIGN = ["use_beam_search", "prompt_logprobs", "guided_json", "guided_regex", "truncate_prompt_tokens",
           "bad_words", "allowed_token_ids", "length_penalty", "spaces_between_special_tokens",
           "return_tokens_as_token_ids", "chat_template", "chat_template_kwargs", "continue_final_message",
           "documents", "priority", "request_id", "logits_processors", "structured_outputs", "max_token",
           "temprature", "stream_include_usage", "stream_continuous_usage_stats", "frobnicate"]


def documented_fields() -> dict[str, set[str]]:
    """Endpoint path -> the field names FIELDS.md lists (nested ones as `stream_options.x`)."""
    out, path = {}, None
    with open(FIELDS_MD) as f:
        for line in f:
            heading = re.match(r"## POST (\S+)", line)
            if heading:
                path = heading.group(1)
                out[path] = set()
            row = re.match(r"\| `([a-z_.]+)` \|", line)
            if row and path:
                out[path].add(row.group(1))
    return out


def schema_fields(schema: dict, prefix: str = "") -> set[str]:
    """The properties a request schema documents, nested objects' as `parent.child`, every union member's."""
    names = set()
    for member in schema.get("oneOf", []) + schema.get("anyOf", []):
        names |= schema_fields(member, prefix)
    for name, prop in schema.get("properties", {}).items():
        names.add(prefix + name)
        for member in [prop] + prop.get("anyOf", []):
            if member.get("type") == "object" and "properties" in member:
                names |= schema_fields(member, f"{prefix}{name}.")
    return names


async def post(session, url, body):
    async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


def probe_bodies(path: str, name: str) -> list[dict]:
    """Bodies that carry `name` as null (always valid for a known field) beside a valid rest."""
    if "." in name:
        parent, child = name.split(".")
        base = {"prompt": "Hi"} if path == COMPLETIONS else {"messages": MESSAGES}
        return [dict(base, stream=True, **{parent: {child: None}})]
    bases = {CHAT: [{"messages": MESSAGES, "max_tokens": 1}],
             COMPLETIONS: [{"prompt": "Hi", "max_tokens": 1}],
             "/v1/detokenize": [{"tokens": [5]}], "/v1/score": [{"query": "a", "label_token_ids": [5]}],
             "/v1/tokenize": [{"prompt": "Hi"}, {"messages": MESSAGES}]}[path]
    return [dict(base, **{name: None}) if name not in base else base for base in bases]


async def accepted_fields(session, url: str, path: str, candidates: set[str]) -> set[str]:
    accepted = set()
    for name in sorted(candidates):
        for body in probe_bodies(path, name):
            status, raw = await post(session, url + path, body)
            error = orjson.loads(raw).get("error") if status != 200 or b'"error"' in raw[:20] else None
            if not (error and error["code"] == "unknown_field" and error["param"] == name):
                accepted.add(name)
                break
    return accepted


async def test_the_page_the_document_and_the_server_agree(fake_server):
    listed = documented_fields()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(fake_server.url + "/openapi.json") as r:
            spec = await r.json()
        posts = {path: op["post"] for path, op in spec["paths"].items() if "post" in op}
        assert set(posts) == set(listed)
        for path, op in posts.items():
            in_document = schema_fields(op["requestBody"]["content"]["application/json"]["schema"])
            assert listed[path] == in_document, path
            probed = in_document | set(FOREIGN) | {f"stream_options.{n}" for n in ("bogus", "include_usage")}
            if path not in (CHAT, COMPLETIONS):
                probed = {n for n in probed if "." not in n}
            assert await accepted_fields(session, fake_server.url, path, probed) == in_document, path


def sse_events(raw: bytes) -> list[dict]:
    lines = [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]", raw[-200:]
    return [orjson.loads(line) for line in lines[:-1]]


# What guidellm 0.8 sends (backends/openai/request_handlers.py), streaming and not.
GUIDELLM_CHAT = {"model": "llama", "max_completion_tokens": 6, "stop": None, "ignore_eos": True,
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}]}
GUIDELLM_COMPLETION = {"model": "llama", "max_tokens": 6, "stop": None, "ignore_eos": True,
                       "prompt": "Tell me a story"}
GUIDELLM_STREAM = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@pytest.mark.parametrize("path,body", [(CHAT, GUIDELLM_CHAT), (COMPLETIONS, GUIDELLM_COMPLETION)],
                         ids=["chat", "completions"])
async def test_guidellm_request_shapes(fake_server, path, body):
    tok = fake_server.engine.tokenizer
    if path == CHAT:  # guidellm sends no temperature: the text is sampled, the token counts are not
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a story"}])
    else:
        prompt_ids = tok.encode("Tell me a story")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        status, raw = await post(session, fake_server.url + path, body)
        assert status == 200, raw
        whole = orjson.loads(raw)
        assert whole["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                                  "total_tokens": len(prompt_ids) + 6}
        status, raw = await post(session, fake_server.url + path, dict(body, **GUIDELLM_STREAM))
        assert status == 200, raw
    events = sse_events(raw)
    assert all(e["usage"] is not None for e in events), events
    assert all(e["usage"]["prompt_tokens"] == len(prompt_ids) for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] < 6
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in events)
    assert events[-1]["choices"] == []
    finals = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finals == ["length"]


async def test_usage_only_at_the_end_without_continuous_stats(fake_server):
    body = dict(GUIDELLM_COMPLETION, stream=True, stream_options={"include_usage": True})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        status, raw = await post(session, fake_server.url + COMPLETIONS, body)
    events = sse_events(raw)
    assert status == 200 and all(e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 6


async def test_no_effect_fields_change_nothing(fake_server):
    plain = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    noise = {"user": "u-1", "metadata": {"team": "search"}, "store": True, "service_tier": "flex",
             "prompt_cache_key": "k", "safety_identifier": "s", "parallel_tool_calls": False,
             "prediction": {"type": "content", "content": "Hi"}, "tools": [], "tool_choice": "none",
             "functions": [], "function_call": "none", "modalities": ["text"],
             "response_format": {"type": "text"}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        status, a = await post(session, fake_server.url + CHAT, plain)
        status2, b = await post(session, fake_server.url + CHAT, dict(plain, **noise))
        status3, c = await post(session, fake_server.url + COMPLETIONS,
                                {"prompt": "Hi", "max_tokens": 3, "user": "u", "echo": False, "suffix": "",
                                 "best_of": 1})
    assert status == status2 == status3 == 200, (a, b, c)
    first, second = orjson.loads(a), orjson.loads(b)
    assert first["choices"] == second["choices"]
    assert first["usage"]["total_tokens"] == second["usage"]["total_tokens"]


async def test_include_stop_str_in_output(fake_server):
    engine = fake_server.engine
    full = engine.tokenizer.decode(fake_runner.fake_greedy(engine.tokenizer.encode("Hello"), 10,
                                                           engine.runner.vocab_size))
    stop = full[3:5]
    body = {"prompt": "Hello", "max_tokens": 10, "temperature": 0, "stop": [stop]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        _, without = await post(session, fake_server.url + COMPLETIONS, body)
        included = dict(body, include_stop_str_in_output=True)
        _, with_stop = await post(session, fake_server.url + COMPLETIONS, included)
        _, streamed = await post(session, fake_server.url + COMPLETIONS, dict(included, stream=True))
    end = full.index(stop)
    assert orjson.loads(without)["choices"][0]["text"] == full[:end]
    assert orjson.loads(with_stop)["choices"][0]["text"] == full[:end + len(stop)]
    assert "".join(c["text"] for e in sse_events(streamed) for c in e["choices"]) == full[:end + len(stop)]


async def test_tokenize_and_detokenize(fake_server):
    tok = fake_server.engine.tokenizer
    url = fake_server.url
    text = "Hello there, world"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        status, raw = await post(session, url + "/v1/tokenize", {"model": "llama", "prompt": text})
        plain = orjson.loads(raw)
        assert status == 200 and plain["tokens"] == tok.encode(text)
        assert plain["count"] == len(plain["tokens"])
        assert plain["max_model_len"] == fake_server.engine.max_model_len and plain["token_strs"] is None
        _, raw = await post(session, url + "/v1/tokenize", {"prompt": text, "add_special_tokens": False,
                                                            "return_token_strs": True})
        bare = orjson.loads(raw)
        assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
        assert bare["token_strs"] == tok.token_strings(bare["tokens"])
        assert len(bare["token_strs"]) == bare["count"]
        _, raw = await post(session, url + "/v1/tokenize", {"messages": MESSAGES})
        chat = orjson.loads(raw)
        assert chat["tokens"] == tok.apply_chat_template(MESSAGES)
        _, raw = await post(session, url + "/v1/tokenize", {"messages": MESSAGES,
                                                            "add_generation_prompt": False})
        no_prompt = orjson.loads(raw)
        assert no_prompt["tokens"] == tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
        assert no_prompt["count"] < chat["count"]
        status, raw = await post(session, url + "/v1/detokenize", {"model": "llama",
                                                                   "tokens": bare["tokens"]})
        assert status == 200 and orjson.loads(raw) == {"prompt": text}
        _, raw = await post(session, url + "/v1/detokenize", {"tokens": chat["tokens"]})
        assert orjson.loads(raw)["prompt"] == tok.decode(chat["tokens"], skip_special_tokens=False)
        _, raw = await post(session, url + "/v1/detokenize", {"tokens": []})
        assert orjson.loads(raw) == {"prompt": ""}


async def test_integers_are_json_schema_integers(fake_server):
    """The document says "integer" (JSON Schema 2020-12): 2.0 is one, 2.5 is not."""
    async with aiohttp.ClientSession() as session:
        body = {"prompt": [5, 6.0], "max_tokens": 2.0, "seed": 3.0, "n": 1.0}
        async with session.post(fake_server.api + "/completions", json=body) as r:
            assert r.status == 200, await r.text()
            usage = (await r.json())["usage"]
            assert usage == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
        async with session.post(fake_server.api + "/completions", json=dict(body, max_tokens=2.5)) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "max_tokens"
