"""What the server really sends matches the response models of api/responses.py (unknown fields forbidden),
and /openapi.json describes its responses with those same models."""

import aiohttp
import orjson
import pytest

from kvloom.api import responses
from kvloom.api.openapi import request_schema

pytestmark = pytest.mark.timeout(180)

MESSAGES = [{"role": "user", "content": "hi"}]
BODIES = {  # name -> (path, body, the response model, the model of each streamed event)
    "chat": ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "logprobs": True,
                                      "top_logprobs": 2, "n": 2}, responses.ChatCompletion, None),
    "chat-stream": ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "stream": True,
                                             "logprobs": True, "stream_options": {
                                                 "include_usage": True, "continuous_usage_stats": True}},
                    None, responses.ChatCompletionChunk),
    "completion-echo": ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 2, "echo": True},
                        responses.Completion, None),
    "completion-stream": ("/v1/completions", {"prompt": ["hi", "yo"], "max_tokens": 3, "stream": True,
                                              "logprobs": 1, "stream_options": {"include_usage": True}},
                          None, responses.Completion),
    "score": ("/v1/score", {"query": [5, 6, 7], "items": [[8], [9, 10]], "label_token_ids": [1, 2]},
              responses.ScoreResponse, None),
    "tokenize": ("/v1/tokenize", {"prompt": "hi", "return_token_strs": True}, responses.TokenizeResponse,
                 None),
    "tokenize-chat": ("/v1/tokenize", {"messages": MESSAGES}, responses.TokenizeResponse, None),
    "detokenize": ("/v1/detokenize", {"tokens": [5, 6]}, responses.DetokenizeResponse, None),
    "error": ("/v1/completions", {"prompt": "hi", "max_tokenz": 3}, responses.ErrorResponse, None),
}


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_responses_match_their_models(fake_server, name):
    path, body, model, event_model = BODIES[name]
    async with aiohttp.ClientSession() as session:
        async with session.post(fake_server.url + path, json=body) as r:
            raw = await r.read()
    if event_model is None:
        model.model_validate(orjson.loads(raw))
        return
    lines = raw.decode().split("\n\n")
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    for event in events[:-1]:
        event_model.model_validate(orjson.loads(event))


async def test_models_and_model_card(fake_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(fake_server.api + "/models") as r:
            listed = responses.ModelList.model_validate(await r.json())
        async with session.get(fake_server.api + "/models/" + listed.data[0].id) as r:
            responses.ModelCard.model_validate(await r.json())
        async with session.get(fake_server.api + "/models/nope") as r:
            assert r.status == 404
            responses.ErrorResponse.model_validate(await r.json())


async def test_the_document_describes_responses_with_the_models(fake_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(fake_server.url + "/openapi.json") as r:
            spec = await r.json()
    for path, _, model, event_model in BODIES.values():
        if model is responses.ErrorResponse:
            continue
        ok = spec["paths"][path]["post"]["responses"]["200"]["content"]
        if model is not None:
            assert ok["application/json"]["schema"] == request_schema(model)
        if event_model is not None:
            assert ok["text/event-stream"]["schema"] == request_schema(event_model)
    assert spec["components"]["schemas"]["Error"] == request_schema(responses.ErrorResponse)
    models = spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == request_schema(responses.ModelList)
