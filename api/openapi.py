"""The OpenAPI 3.1 description of the HTTP surface. Request bodies are rendered from the very models that
validate them (`api/protocol.py`), so the document and the server cannot disagree on a field."""

from __future__ import annotations

from kvloom.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ScoreRequest,
                                 TokenizeRequest)

OPENAPI_VERSION = "3.1.0"
_ERROR = {"$ref": "#/components/schemas/Error"}


def request_schema(model) -> dict:
    """The JSON Schema (2020-12, as OpenAPI 3.1 takes it) of a request model or TypeAdapter, self-contained:
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


def openapi_spec(model_name: str) -> dict:
    def post(model, summary, codes):
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": request_schema(model)}}},
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

    generation_codes = (400, 404, 413, 429, 500, 503)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "kvloom", "version": "0.1.0", "description": f"Serving {model_name}"},
        "paths": {
            "/v1/completions": post(CompletionRequest, "Text completion", generation_codes),
            "/v1/chat/completions": post(ChatCompletionRequest, "Chat completion", generation_codes),
            "/v1/score": post(ScoreRequest, "Multi-item scoring", (400, 404, 413, 429, 501, 503)),
            "/v1/tokenize": post(TokenizeRequest, "Prompt or chat messages to token ids",
                                 (400, 404, 413, 503)),
            "/v1/detokenize": post(DetokenizeRequest, "Token ids to text", (400, 404, 413, 503)),
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
                                                    "param": {"type": ["string", "null"]},
                                                    "code": {"type": ["string", "null"]}}}},
        }}},
    }
