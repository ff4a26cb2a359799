"""The OpenAPI description of the HTTP surface, kept beside the code that implements it
(and accurate enough for a schema fuzzer to find what the server rejects and what it serves)."""

from __future__ import annotations

from kvloom.api.protocol import MAX_N, MAX_STOP
from kvloom.engine.request import MAX_TOP_LOGPROBS

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error_responses(*codes):
    names = {400: "Invalid request", 404: "Unknown model", 413: "Body too large", 429: "Queue full",
             500: "This request failed inside the engine (code request_failed); the engine carries on",
             501: "Not implemented", 503: "Engine not ready or unavailable"}
    return {str(c): {"description": names[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                       "additionalProperties": False},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]},
    "seed": {"type": "integer", "minimum": 0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "user": {"type": "string"},
    "top_k": {"type": "integer", "minimum": -1, "maximum": 2**31 - 1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 100},
    "ignore_eos": {"type": "boolean"},
    "stop_token_ids": _TOKEN_IDS,
}


def openapi_spec(model_name: str) -> dict:
    completion = {
        "type": "object", "additionalProperties": False, "required": ["prompt"],
        "properties": dict(_SAMPLING, **{
            "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                 {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                 dict(_TOKEN_IDS, minItems=1),
                                 {"type": "array", "minItems": 1, "items": dict(_TOKEN_IDS, minItems=1)}]},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            "echo": {"type": "boolean", "enum": [False]},
        }),
    }
    message = {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant", "developer"]},
                       "content": {"type": "string"}},
    }
    chat = {
        "type": "object", "additionalProperties": False, "required": ["messages"],
        "properties": dict(_SAMPLING, **{
            "messages": {"type": "array", "minItems": 1, "items": message},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
        }),
    }
    text_or_ids = {"oneOf": [{"type": "string", "minLength": 1}, dict(_TOKEN_IDS, minItems=1)]}
    score = {
        "type": "object", "additionalProperties": False, "required": ["query", "label_token_ids"],
        "properties": {"model": {"type": "string"}, "query": text_or_ids,
                       "items": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                           {"type": "array", "items": _TOKEN_IDS}]},
                       "label_token_ids": dict(_TOKEN_IDS, minItems=1), "apply_softmax": {"type": "boolean"},
                       "item_first": {"type": "boolean"}},
    }

    def post(schema, summary, codes):
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": dict({"200": {"description": "OK (JSON, or text/event-stream when stream is true)",
                                       "content": {"application/json": {"schema": {"type": "object"}}}}},
                              **_error_responses(*codes)),
        }}

    def get(summary, codes=(), content="application/json"):
        return {"get": {"summary": summary, "responses": dict(
            {"200": {"description": "OK", "content": {content: {"schema": {"type": "object"} if
                                                                 content == "application/json" else
                                                                 {"type": "string"}}}}},
            **_error_responses(*codes))}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "kvloom", "version": "0.1.0", "description": f"Serving {model_name}"},
        "paths": {
            "/v1/completions": post(completion, "Text completion", (400, 404, 413, 429, 500, 503)),
            "/v1/chat/completions": post(chat, "Chat completion", (400, 404, 413, 429, 500, 503)),
            "/v1/score": post(score, "Multi-item scoring", (400, 404, 413, 429, 501, 503)),
            "/v1/models": get("Served models"),
            "/v1/models/{model}": {"get": dict(get("One model", (404,))["get"], parameters=[
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}])},
            "/health": get("Liveness", (503,)),
            "/ready": get("Readiness", (503,)),
            "/status": get("State detail"),
            "/metrics": get("Prometheus metrics", content="text/plain"),
        },
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                     "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                    "param": {"type": "string", "nullable": True},
                                                    "code": {"type": "string", "nullable": True}}}},
        }}},
    }
