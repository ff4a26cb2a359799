"""Bad requests against the real server: each gets its exact status, names the offending field in
`error.param`, and comes back in OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
A bad request never disturbs good ones running beside it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.timeout(60)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
VOCAB = 384  # tests.tiny_models.VOCAB_SIZE
MAX_MODEL_LEN = 256  # tests.conftest.tiny_engine_config
OVERSIZED = 4 * 2**20 + 1024  # past api.server.DEFAULT_MAX_BODY_BYTES

_NO_BODY = object()
INVALID = "invalid_request_error"


@dataclass(frozen=True)
class Bad:
    """One bad request and what the server must answer."""

    path: str
    body: Any = _NO_BODY  # sent as JSON unless `raw` is given
    status: int = 400
    param: Optional[str] = None
    code: Optional[str] = "invalid_value"
    type: str = INVALID
    method: str = "POST"
    raw: Optional[bytes] = None
    content_type: Optional[str] = "application/json"

    def request_kwargs(self) -> dict:
        headers = {}
        data = None
        if self.raw is not None:
            data = self.raw
        elif self.body is not _NO_BODY:
            data = orjson.dumps(self.body)
        if data is not None and self.content_type is not None:
            headers["Content-Type"] = self.content_type
        return {"data": data, "headers": headers}


def completion(**fields) -> dict:
    return dict({"model": "llama", "prompt": "Hello", "max_tokens": 2}, **fields)


def chat(**fields) -> dict:
    messages = [{"role": "user", "content": "Hello"}]
    return dict({"model": "llama", "messages": messages, "max_tokens": 2}, **fields)


def json_schema(schema, name: str = "thing") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def without(body: dict, name: str) -> dict:
    return {k: v for k, v in body.items() if k != name}


def case(id_: str, bad: Bad, *, xfail: Optional[str] = None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(bad, id=id_, marks=marks)


TABLE = [
    # ---- the body itself ---------------------------------------------------------------------------
    case("malformed-json", Bad(COMPLETIONS, raw=b'{"prompt": "Hello",', code="invalid_json")),
    case("empty-body", Bad(COMPLETIONS, raw=b"", code="invalid_json")),
    case("json-array-body", Bad(COMPLETIONS, body=[{"prompt": "Hello"}], code="invalid_body")),
    case("json-string-body", Bad(CHAT, body="Hello", code="invalid_body")),
    case("text-plain-content-type", Bad(COMPLETIONS, body=completion(), content_type="text/plain",
                                        param="content-type", code="invalid_content_type")),
    case("no-content-type", Bad(COMPLETIONS, raw=orjson.dumps(completion()), content_type=None,
                                param="content-type", code="invalid_content_type")),
    case("unknown-top-level-field", Bad(COMPLETIONS, completion(frobnicate=1), param="frobnicate",
                                        code="unknown_field")),
    case("chat-field-on-completions", Bad(COMPLETIONS, completion(messages=[]), param="messages",
                                          code="unknown_field")),
    case("completion-field-on-chat", Bad(CHAT, chat(prompt="Hello"), param="prompt", code="unknown_field")),
    case("unknown-stream-options-field", Bad(COMPLETIONS, completion(stream=True, stream_options={
        "include_usage": True, "bogus": 1}), param="stream_options.bogus", code="unknown_field")),
    case("stream-options-without-stream", Bad(COMPLETIONS, completion(stream_options={"include_usage": True}),
                                              param="stream_options")),
    case("stream-options-include-usage-string", Bad(CHAT, chat(stream=True, stream_options={
        "include_usage": "yes"}), param="stream_options.include_usage", code="invalid_type")),
    # ---- wrong types and ranges of the common fields -----------------------------------------------
    case("model-integer", Bad(COMPLETIONS, completion(model=5), param="model", code="invalid_type")),
    case("max_tokens-string", Bad(COMPLETIONS, completion(max_tokens="5"), param="max_tokens",
                                  code="invalid_type")),
    case("max_tokens-float", Bad(COMPLETIONS, completion(max_tokens=2.5), param="max_tokens",
                                 code="invalid_type")),
    case("max_tokens-bool", Bad(COMPLETIONS, completion(max_tokens=True), param="max_tokens",
                                code="invalid_type")),
    case("max_tokens-zero", Bad(COMPLETIONS, completion(max_tokens=0), param="max_tokens")),
    case("max_completion_tokens-zero", Bad(CHAT, chat(max_completion_tokens=0),
                                           param="max_completion_tokens")),
    case("temperature-string", Bad(COMPLETIONS, completion(temperature="hot"), param="temperature",
                                   code="invalid_type")),
    case("temperature-too-high", Bad(CHAT, chat(temperature=2.5), param="temperature")),
    case("n-zero", Bad(COMPLETIONS, completion(n=0), param="n")),
    case("n-17", Bad(CHAT, chat(n=17), param="n")),
    case("stream-yes", Bad(COMPLETIONS, completion(stream="yes"), param="stream", code="invalid_type")),
    case("stop-integer", Bad(COMPLETIONS, completion(stop=5), param="stop", code="invalid_type")),
    case("stop-list-with-non-string", Bad(COMPLETIONS, completion(stop=["a", 3]), param="stop[1]")),
    case("stop-list-with-empty-string", Bad(CHAT, chat(stop=["a", ""]), param="stop[1]")),
    case("stop-too-many", Bad(COMPLETIONS, completion(stop=[str(i) for i in range(9)]), param="stop")),
    case("seed-negative", Bad(COMPLETIONS, completion(seed=-1), param="seed")),
    case("seed-past-int64", Bad(COMPLETIONS, completion(seed=2**63), param="seed")),
    case("completion-logprobs-21", Bad(COMPLETIONS, completion(logprobs=21), param="logprobs")),
    case("chat-logprobs-integer", Bad(CHAT, chat(logprobs=3), param="logprobs", code="invalid_type")),
    case("chat-top_logprobs-without-logprobs", Bad(CHAT, chat(top_logprobs=2), param="top_logprobs")),
    case("chat-top_logprobs-21", Bad(CHAT, chat(logprobs=True, top_logprobs=21), param="top_logprobs")),
    case("presence_penalty-3", Bad(COMPLETIONS, completion(presence_penalty=3), param="presence_penalty")),
    case("frequency_penalty-minus-3", Bad(CHAT, chat(frequency_penalty=-3), param="frequency_penalty")),
    case("top_p-zero", Bad(COMPLETIONS, completion(top_p=0), param="top_p")),
    case("top_p-1.5", Bad(COMPLETIONS, completion(top_p=1.5), param="top_p")),
    case("top_k-minus-2", Bad(COMPLETIONS, completion(top_k=-2), param="top_k")),
    case("top_k-past-int32", Bad(COMPLETIONS, completion(top_k=2**31), param="top_k")),
    case("min_p-2", Bad(COMPLETIONS, completion(min_p=2), param="min_p")),
    case("repetition_penalty-zero", Bad(CHAT, chat(repetition_penalty=0), param="repetition_penalty")),
    case("ignore_eos-no", Bad(COMPLETIONS, completion(ignore_eos="no"), param="ignore_eos",
                              code="invalid_type")),
    case("stop_token_ids-string", Bad(COMPLETIONS, completion(stop_token_ids=["a"]),
                                      param="stop_token_ids[0]", code="invalid_type")),
    case("stop_token_ids-not-a-list", Bad(CHAT, chat(stop_token_ids=7), param="stop_token_ids",
                                          code="invalid_type")),
    case("user-integer", Bad(COMPLETIONS, completion(user=7), param="user", code="invalid_type")),
    case("logit_bias-101", Bad(COMPLETIONS, completion(logit_bias={"5": 101}), param="logit_bias.5")),
    case("logit_bias-key-not-a-token-id", Bad(CHAT, chat(logit_bias={"x": 1}), param="logit_bias.x")),
    case("logit_bias-value-string", Bad(CHAT, chat(logit_bias={"5": "1"}), param="logit_bias.5",
                                        code="invalid_type")),
    case("logit_bias-out-of-vocab", Bad(COMPLETIONS, completion(logit_bias={str(VOCAB): 1}),
                                        param=f"logit_bias.{VOCAB}")),
    case("logit_bias-too-many", Bad(COMPLETIONS, completion(logit_bias={str(i): 1 for i in range(257)}),
                                    param="logit_bias")),
    case("min_tokens-negative", Bad(COMPLETIONS, completion(min_tokens=-1), param="min_tokens")),
    case("min_tokens-past-max_tokens", Bad(CHAT, chat(min_tokens=5), param="min_tokens")),
    case("skip_special_tokens-string", Bad(CHAT, chat(skip_special_tokens="no"), param="skip_special_tokens",
                                           code="invalid_type")),
    case("include_stop_str_in_output-integer", Bad(COMPLETIONS, completion(include_stop_str_in_output=1),
                                                   param="include_stop_str_in_output", code="invalid_type")),
    case("continuous_usage_stats-string", Bad(CHAT, chat(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": "yes"}),
        param="stream_options.continuous_usage_stats", code="invalid_type")),
    case("stop_token_ids-too-many", Bad(CHAT, chat(stop_token_ids=list(range(65))), param="stop_token_ids")),
    case("typo-max_token", Bad(CHAT, chat(max_token=5), param="max_token", code="unknown_field")),
    case("chat-audio", Bad(CHAT, chat(audio={"voice": "alloy", "format": "wav"}), param="audio",
                           code="unsupported")),
    case("chat-reasoning_effort", Bad(CHAT, chat(reasoning_effort="high"), param="reasoning_effort",
                                      code="unsupported")),
    case("chat-modalities-audio", Bad(CHAT, chat(modalities=["text", "audio"]), param="modalities",
                                      code="unsupported")),
    case("chat-metadata-not-strings", Bad(CHAT, chat(metadata={"a": 1}), param="metadata.a",
                                          code="invalid_type")),
    case("best_of-not-n", Bad(COMPLETIONS, completion(best_of=3), param="best_of", code="unsupported")),
    case("suffix-given", Bad(COMPLETIONS, completion(suffix="!"), param="suffix", code="unsupported")),
    # ---- prompts -----------------------------------------------------------------------------------
    case("prompt-missing", Bad(COMPLETIONS, without(completion(), "prompt"), param="prompt",
                               code="missing_field")),
    case("prompt-null", Bad(COMPLETIONS, completion(prompt=None), param="prompt", code="missing_field")),
    case("prompt-empty-string", Bad(COMPLETIONS, completion(prompt=""), param="prompt")),
    case("prompt-empty-list", Bad(COMPLETIONS, completion(prompt=[]), param="prompt")),
    case("prompt-mixed-list", Bad(COMPLETIONS, completion(prompt=["Hello", 5]), param="prompt",
                                  code="invalid_type")),
    case("prompt-object", Bad(COMPLETIONS, completion(prompt={"text": "Hello"}), param="prompt",
                              code="invalid_type")),
    case("prompt-token-out-of-vocab", Bad(COMPLETIONS, completion(prompt=[5, VOCAB]), param="prompt[1]")),
    case("prompt-token-negative", Bad(COMPLETIONS, completion(prompt=[-1, 5]), param="prompt[0]")),
    case("prompt-nested-non-integer", Bad(COMPLETIONS, completion(prompt=[[5, 6], [7, "x"]]),
                                          param="prompt[1][1]", code="invalid_type")),
    case("prompt-over-context", Bad(COMPLETIONS, completion(prompt=[5] * 300, max_tokens=1), param="prompt")),
    case("prompt-at-context", Bad(COMPLETIONS, completion(prompt=[5] * MAX_MODEL_LEN, max_tokens=1),
                                  param="prompt")),
    case("max_tokens-cannot-fit", Bad(COMPLETIONS, completion(prompt=[5] * 200, max_tokens=100),
                                      param="max_tokens")),
    case("echo-string", Bad(COMPLETIONS, completion(echo="yes"), param="echo", code="invalid_type")),
    case("max_tokens-zero-echo-false", Bad(COMPLETIONS, completion(max_tokens=0, echo=False),
                                           param="max_tokens")),
    case("max_tokens-negative-with-echo", Bad(COMPLETIONS, completion(max_tokens=-1, echo=True),
                                              param="max_tokens")),
    case("echo-logprobs-21", Bad(COMPLETIONS, completion(echo=True, max_tokens=0, logprobs=21),
                                 param="logprobs")),
    case("echo-prompt-over-context", Bad(COMPLETIONS, completion(prompt=[5] * 300, max_tokens=0, echo=True),
                                         param="prompt")),
    case("chat-echo", Bad(CHAT, chat(echo=True), param="echo", code="unknown_field")),
    # ---- chat messages -----------------------------------------------------------------------------
    case("messages-missing", Bad(CHAT, without(chat(), "messages"), param="messages", code="missing_field")),
    case("messages-empty", Bad(CHAT, chat(messages=[]), param="messages")),
    case("messages-not-a-list", Bad(CHAT, chat(messages="Hello"), param="messages")),
    case("message-not-an-object", Bad(CHAT, chat(messages=["Hello"]), param="messages[0]")),
    case("message-bad-role", Bad(CHAT, chat(messages=[{"role": "user", "content": "a"},
                                                      {"role": "wizard", "content": "b"}]),
                                 param="messages[1].role")),
    case("message-missing-content", Bad(CHAT, chat(messages=[{"role": "user"}]),
                                        param="messages[0].content")),
    case("message-non-string-content", Bad(CHAT, chat(messages=[{"role": "user", "content": 5}]),
                                           param="messages[0].content")),
    case("message-image-part", Bad(CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), param="messages[0].content[0].type")),
    case("chat-huge-message", Bad(CHAT, without(chat(messages=[{"role": "user",
                                                                "content": "Hello world! " * 400}]),
                                                "max_tokens"), param="messages")),
    case("chat-max_tokens-cannot-fit", Bad(CHAT, chat(messages=[{"role": "user",
                                                                 "content": "Hello world! " * 30}],
                                                      max_tokens=MAX_MODEL_LEN), param="max_tokens")),
    case("chat-tools", Bad(CHAT, chat(tools=[{"type": "function",
                                              "function": {"name": "f", "parameters": {}}}]),
                           param="tools", code="unsupported")),
    case("chat-tool_choice", Bad(CHAT, chat(tool_choice="auto"), param="tool_choice", code="unsupported")),
    # ---- response_format ---------------------------------------------------------------------------
    case("response_format-unknown-type", Bad(CHAT, chat(response_format={"type": "xml"}),
                                             param="response_format", code="invalid_type")),
    case("response_format-json_schema-missing", Bad(CHAT, chat(response_format={"type": "json_schema"}),
                                                    param="response_format.json_schema",
                                                    code="missing_field")),
    case("response_format-schema-not-an-object", Bad(CHAT, chat(response_format=json_schema([1, 2])),
                                                     param="response_format.json_schema.schema",
                                                     code="invalid_type")),
    case("response_format-schema-bad-type", Bad(CHAT, chat(response_format=json_schema({"type": "strin"})),
                                                param="response_format.json_schema.schema")),
    case("response_format-schema-unsatisfiable", Bad(COMPLETIONS, completion(response_format=json_schema(
        {"type": "integer", "minimum": 5, "maximum": 3})), param="response_format.json_schema.schema")),
    case("response_format-schema-unimplemented", Bad(CHAT, chat(response_format=json_schema(
        {"not": {"type": "string"}})), param="response_format.json_schema.schema")),
    case("response_format-schema-remote-ref", Bad(CHAT, chat(response_format=json_schema(
        {"$ref": "https://example.com/s.json"})), param="response_format.json_schema.schema")),
    case("response_format-schema-bad-pattern", Bad(COMPLETIONS, completion(response_format=json_schema(
        {"type": "string", "pattern": "(("})), param="response_format.json_schema.schema")),
    case("response_format-name-invalid", Bad(CHAT, chat(response_format=json_schema({}, name="a b")),
                                             param="response_format.json_schema.name")),
    case("response_format-unknown-field", Bad(CHAT, chat(response_format={"type": "json_object", "x": 1}),
                                              param="response_format.x", code="unknown_field")),
    case("response_format-with-ignore_eos", Bad(CHAT, chat(response_format={"type": "json_object"},
                                                           ignore_eos=True), param="ignore_eos")),
    case("response_format-with-min_tokens", Bad(COMPLETIONS, completion(
        response_format={"type": "json_object"}, min_tokens=1), param="min_tokens")),
    # ---- models, routes, methods, sizes ------------------------------------------------------------
    case("unknown-model-completions", Bad(COMPLETIONS, completion(model="nope"), status=404, param="model",
                                          code="model_not_found")),
    case("unknown-model-chat", Bad(CHAT, chat(model="gpt-4o"), status=404, param="model",
                                   code="model_not_found")),
    case("get-unknown-model", Bad("/v1/models/nope", method="GET", status=404, param="model",
                                  code="model_not_found")),
    case("unknown-route", Bad("/v1/nope", method="GET", status=404, code="not_found")),
    case("unknown-route-post", Bad("/v1/engines/llama/completions", body=completion(), status=404,
                                   code="not_found")),
    case("get-completions", Bad(COMPLETIONS, method="GET", status=405, code="method_not_allowed")),
    case("delete-chat", Bad(CHAT, method="DELETE", status=405, code="method_not_allowed")),
    case("post-models", Bad("/v1/models", body={}, status=405, code="method_not_allowed")),
    case("oversized-body", Bad(COMPLETIONS, raw=b'{"prompt": "' + b"a" * OVERSIZED + b'"}', status=413,
                               code="request_too_large")),
    case("score-malformed-json", Bad("/v1/score", raw=b"{", code="invalid_json")),
    case("score-unknown-field", Bad("/v1/score", {"query": "a", "label_token_ids": [1], "labels": [1]},
                                    param="labels", code="unknown_field")),
    case("score-query-missing", Bad("/v1/score", {"label_token_ids": [1]}, param="query",
                                    code="missing_field")),
    case("score-label_token_ids-null", Bad("/v1/score", {"query": "a", "label_token_ids": None},
                                           param="label_token_ids", code="missing_field")),
    case("score-items-mixed", Bad("/v1/score", {"query": "a", "items": ["b", [1]], "label_token_ids": [1]},
                                  param="items", code="invalid_type")),
    case("score-model-integer", Bad("/v1/score", {"model": 1, "query": "a", "label_token_ids": [1]},
                                    param="model", code="invalid_type")),
    case("tokenize-prompt-missing", Bad("/v1/tokenize", {"model": "llama"}, param="prompt",
                                        code="missing_field")),
    case("tokenize-unknown-field", Bad("/v1/tokenize", {"prompt": "a", "truncate": 3}, param="truncate",
                                       code="unknown_field")),
    case("tokenize-chat-bad-role", Bad("/v1/tokenize", {"messages": [{"role": "wizard", "content": "a"}]},
                                       param="messages[0].role")),
    case("tokenize-chat-field-on-prompt", Bad("/v1/tokenize", {"prompt": "a", "add_generation_prompt": True},
                                              param="add_generation_prompt", code="unknown_field")),
    case("detokenize-out-of-vocab", Bad("/v1/detokenize", {"tokens": [5, VOCAB]}, param="tokens[1]")),
    case("detokenize-not-ids", Bad("/v1/detokenize", {"tokens": "abc"}, param="tokens", code="invalid_type")),
    case("detokenize-unknown-model", Bad("/v1/detokenize", {"model": "nope", "tokens": [5]}, status=404,
                                         param="model", code="model_not_found")),
]

assert len(TABLE) >= 45


def _is_xfail(param) -> bool:
    return any(m.name == "xfail" for m in param.marks)


async def send(session: aiohttp.ClientSession, url: str, bad: Bad) -> tuple[int, dict, bytes]:
    async with session.request(bad.method, url + bad.path, **bad.request_kwargs()) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def check(bad: Bad, status: int, headers: dict, raw: bytes) -> None:
    assert status == bad.status, raw[:500]
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    body = orjson.loads(raw)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["param"] == bad.param, error
    assert error["code"] == bad.code, error
    assert error["type"] == bad.type, error
    if bad.param is not None:  # the message names the field too
        assert error["message"].startswith(bad.param), error


@pytest.mark.parametrize("bad", TABLE)
async def test_bad_request(fake_server, bad: Bad):
    timeout = aiohttp.ClientTimeout(total=8)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status, headers, raw = await send(session, fake_server.url, bad)
    check(bad, status, headers, raw)
    assert fake_server.engine.is_ready
    assert fake_server.engine.scheduler.num_running == 0
    assert fake_server.engine.scheduler.num_waiting == 0


async def test_method_not_allowed_names_the_allowed_method(fake_server):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8)) as session:
        async with session.get(fake_server.url + COMPLETIONS) as resp:
            assert resp.status == 405
            assert resp.headers.get("Allow") == "POST"


GOOD = [
    (COMPLETIONS, {"model": "llama", "prompt": "Hello world", "max_tokens": 3, "temperature": 0}),
    (COMPLETIONS, {"model": "llama", "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0}),
    (COMPLETIONS, {"prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0, "stop": ["zzzz"]}),
    (CHAT, {"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0}),
    (CHAT, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}],
            "max_tokens": 3, "temperature": 0}),
]


async def test_bad_requests_do_not_disturb_good_ones(fake_server):
    bads = [p.values[0] for p in TABLE]
    known_bugs = {i for i, p in enumerate(TABLE) if _is_xfail(p)}
    timeout = aiohttp.ClientTimeout(total=8)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def good(path, body):
            async with session.post(fake_server.url + path, json=body) as resp:
                return resp.status, await resp.json()

        results = await asyncio.gather(*[good(path, body) for path, body in GOOD],
                                       *[send(session, fake_server.url, bad) for bad in bads])
    for (path, _), (status, body) in zip(GOOD, results[:len(GOOD)]):
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 3, body
        (choice,) = body["choices"]
        assert choice["finish_reason"] == "length", body
        assert (choice["message"]["content"] if path == CHAT else choice["text"]), body
    for i, (bad, (status, headers, raw)) in enumerate(zip(bads, results[len(GOOD):])):
        if i in known_bugs:
            assert status < 500, (TABLE[i].id, status, raw[:500])
            continue
        check(bad, status, headers, raw)
    engine = fake_server.engine
    assert engine.is_ready
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
