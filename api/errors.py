"""Errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Optional

import orjson
from aiohttp import web


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=orjson.dumps(self.body()),
                            content_type="application/json", headers=self.headers)


def invalid(param: Optional[str], message: str, code: str = "invalid_value") -> APIError:
    """400 naming the field."""
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def from_value_error(exc: ValueError) -> APIError:
    """Engine-side validation errors start with the field path ("max_tokens: ...")."""
    message = str(exc)
    field, sep, _ = message.partition(":")
    param = field.strip() if sep and " " not in field.strip() else None
    return APIError(400, message, param=param, code="invalid_value")


def not_ready(detail: str) -> APIError:
    return APIError(503, f"the engine is not ready: {detail}", type="service_unavailable",
                    code="engine_not_ready", headers={"Retry-After": "5"})


def unavailable(detail: str) -> APIError:
    return APIError(503, f"the engine is unavailable: {detail}", type="service_unavailable",
                    code="engine_unavailable", headers={"Retry-After": "5"})


def request_failed(detail: str) -> APIError:
    """This request alone failed inside the engine (the engine carries on)."""
    return APIError(500, f"the request failed: {detail}", type="server_error", code="request_failed")


def generation_error(detail: str, code: Optional[str]) -> APIError:
    return request_failed(detail) if code == "request_failed" else unavailable(detail)


def queue_full(detail: str) -> APIError:
    return APIError(429, detail, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def unauthorized() -> APIError:
    """401, as OpenAI answers a missing or wrong key (the openai client raises AuthenticationError)."""
    return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> APIError:
    return APIError(404, f"model: the model {model!r} does not exist", type="invalid_request_error",
                    param="model", code="model_not_found")


def from_http_exception(exc: web.HTTPException, request: web.Request, max_body_bytes: int) -> APIError:
    """aiohttp's own 4xx/5xx (no route, wrong method, body too large) in the envelope."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    code = codes.get(exc.status, "http_error")
    message = {404: f"no route for {request.method} {request.path}",
               413: f"the request body exceeds {max_body_bytes} bytes"}.get(exc.status, exc.reason)
    allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return APIError(exc.status, message, code=code, headers=allow)
