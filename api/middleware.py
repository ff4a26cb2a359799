"""Request middlewares around every route: the access log and the API key.

Order in the app, outermost first: the access log (one line per request, rejected ones included,
with the status the client got), then the server's error envelope, then the API key check (its 401
becomes an envelope like any other error).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from aiohttp import web

from kvloom.api import errors

access_log = logging.getLogger("kvloom.access")

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes never need the API key
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_CLIENT_CLOSED = 499  # the status an access log gives a request whose client went away (as nginx does)


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex


def access_log_middleware(enabled: bool = True):
    """Gives each request an id (sent back in X-Request-Id) and, when enabled, logs
    `METHOD PATH STATUS LATENCYms request_id=ID` at INFO on the `kvloom.access` logger once it ends."""

    @web.middleware
    async def log_access(request: web.Request, handler):
        request[REQUEST_ID_KEY] = request_id = request_id_of(request)
        start = time.perf_counter()
        status = _CLIENT_CLOSED
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            status = 500
            raise
        finally:
            if enabled:
                access_log.info("%s %s %d %.1fms request_id=%s", request.method, request.path, status,
                                (time.perf_counter() - start) * 1000, request_id)

    return log_access


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request's id goes back in a header, streamed responses included."""
    if REQUEST_ID_KEY in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID_KEY]


def require_api_key(api_key: str):
    """Every route but OPEN_PATHS needs `Authorization: Bearer <api_key>`; the comparison takes the same
    time wherever the given key differs."""
    expected = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                raise errors.unauthorized()
        return await handler(request)

    return check
