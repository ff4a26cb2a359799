"""What every kvloom HTTP app shares: the error middleware (everything in the OpenAI envelope) and
reading a JSON body with errors that name the problem."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import orjson
from aiohttp import web

from kvloom.api import errors
from kvloom.api.errors import APIError

log = logging.getLogger(__name__)


def make_error_middleware(count_error: Callable[[web.Request, str], None],
                          max_body_bytes: Callable[[web.Request], int]):
    """A middleware that answers every failure in the envelope; count_error(request, code) counts it."""

    @web.middleware
    async def error_middleware(request: web.Request, handler):
        try:
            return await handler(request)
        except APIError as exc:
            count_error(request, exc.code or exc.type)
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            error = errors.from_http_exception(exc, request, max_body_bytes(request))
            count_error(request, error.code)
            return error.response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - never a bare 500 without the envelope
            log.exception("unhandled error in %s %s", request.method, request.path)
            count_error(request, "internal_error")
            return APIError(500, f"internal error: {type(exc).__name__}", type="server_error",
                            code="internal_error").response()

    return error_middleware


async def read_body(request: web.Request) -> bytes:
    """The raw JSON body: 400 invalid_content_type, 413 past client_max_size."""
    if request.content_type != "application/json":
        raise errors.invalid("content-type", f"must be application/json, got {request.content_type!r}",
                             "invalid_content_type")
    return await request.read()


async def read_json(request: web.Request):
    """The body parsed: 400 invalid_json when it is not JSON."""
    raw = await read_body(request)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid(None, f"the request body is not valid JSON: {exc}", "invalid_json") from None
