"""The OpenAPI 3.1 description of the HTTP surface. Request bodies are rendered from the very models that
validate them (`api/protocol.py`), responses from the models that describe them (`api/responses.py`, which a
test holds the server's real responses to), so the document and the server cannot disagree on a field."""

from __future__ import annotations

from kvloom.api import responses
from kvloom.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ScoreRequest,
                                 TokenizeRequest)

OPENAPI_VERSION = "3.1.0"
_ERROR = {"$ref": "#/components/schemas/Error"}
_STREAM = "text/event-stream"


def request_schema(model) -> dict:
    """The JSON Schema (2020-12, as OpenAPI 3.1 takes it) of a request or response model or TypeAdapter,
    self-contained:
    pydantic's $defs are inlined (no model is recursive) and its generated titles dropped."""
    schema = model.json_schema() if hasattr(model, "validate_json") else model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
        named = ("properties", "patternProperties")  # maps of field names, not schema keywords
        return {key: ({name: resolve(v) for name, v in value.items()} if key in named else resolve(value))
                for key, value in node.items() if key != "title"}

    return resolve(schema)


def _error_responses(*codes):
    names = {400: "Invalid request", 404: "Unknown model", 413: "Body too large", 429: "Queue full",
             500: "This request failed inside the engine (code request_failed); the engine carries on",
             501: "Not implemented", 503: "Engine not ready or unavailable"}
    return {str(c): {"description": names[c],
                     "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _ok(model=None, stream_model=None, content="application/json") -> dict:
    """The 200 response: the body's model as JSON (a streamed request's events: stream_model, one per
    `data:` line), or text."""
    body = {content: {"schema": request_schema(model) if model is not None else {"type": "string"}}}
    if stream_model is not None:
        body[_STREAM] = {"schema": request_schema(stream_model)}
    return {"200": {"description": "OK" + (" (text/event-stream when stream is true: one event per `data:` "
                                           "line, then `data: [DONE]`)" if stream_model else ""),
                    "content": body}}


def openapi_spec(model_name: str) -> dict:
    def post(model, summary, codes, ok):
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": request_schema(model)}}},
            "responses": dict(ok, **_error_responses(*codes)),
        }}

    def get(summary, ok, codes=()):
        return {"get": {"summary": summary, "responses": dict(ok, **_error_responses(*codes))}}

    status = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    generation_codes = (400, 404, 413, 429, 500, 503)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "kvloom", "version": "0.1.0", "description": f"Serving {model_name}"},
        "paths": {
            "/v1/completions": post(CompletionRequest, "Text completion", generation_codes,
                                    _ok(responses.Completion, responses.Completion)),
            "/v1/chat/completions": post(ChatCompletionRequest, "Chat completion", generation_codes,
                                         _ok(responses.ChatCompletion, responses.ChatCompletionChunk)),
            "/v1/score": post(ScoreRequest, "Multi-item scoring", (400, 404, 413, 429, 501, 503),
                              _ok(responses.ScoreResponse)),
            "/v1/tokenize": post(TokenizeRequest, "Prompt or chat messages to token ids",
                                 (400, 404, 413, 503), _ok(responses.TokenizeResponse)),
            "/v1/detokenize": post(DetokenizeRequest, "Token ids to text", (400, 404, 413, 503),
                                   _ok(responses.DetokenizeResponse)),
            "/v1/models": get("Served models", _ok(responses.ModelList)),
            "/v1/models/{model}": {"get": dict(get("One model", _ok(responses.ModelCard), (404,))["get"],
                                               parameters=[{"name": "model", "in": "path", "required": True,
                                                            "schema": {"type": "string"}}])},
            "/health": get("Liveness", status, (503,)),
            "/ready": get("Readiness", status, (503,)),
            "/status": get("State detail", status),
            "/metrics": get("Prometheus metrics", _ok(content="text/plain")),
        },
        "components": {"schemas": {"Error": request_schema(responses.ErrorResponse)}},
    }
