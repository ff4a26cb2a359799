"""Send one request upstream and pass the answer through, with one retry before the first byte.

Data flow per attempt (all on the router's loop):

    take(replica)          num_in_flight += 1, num_queued_tokens += uncached    (counted at send)
    POST upstream          connection error / 503 / 429 before any byte to the client:
                           give the replica back, try the next-best replica once
    first byte back        queued tokens move to decoding
    stream chunk by chunk  an upstream failure after the first byte: an explicit error event,
                           then [DONE]; never a silently cut stream
    give(replica)          counters back, usage.prompt_tokens_details.cached_tokens recorded

Every upstream call has a connect and a read timeout. The decision is in the response headers
X-Kvloom-Replica and X-Kvloom-Cached-Tokens-Predicted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import aiohttp
import orjson
from aiohttp import web

from kvloom.api.errors import APIError
from kvloom.api.router_membership import Membership, Replica
from kvloom.api.router_metrics import RouterMetrics
from kvloom.api.router_policy import Candidate

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0  # longest silence from an upstream between bytes
    max_attempts: int = 2  # the first choice and one retry


class _ClientGone(Exception):
    """The client went away; nothing is wrong upstream."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError is one too
        raise _ClientGone() from exc


class _Load:
    """The share of a replica's counters one request holds, given back exactly once."""

    def __init__(self, replica: Replica, num_uncached: int):
        self.replica, self.num_uncached = replica, num_uncached
        self.is_decoding = False
        replica.num_in_flight += 1
        replica.num_queued_tokens += num_uncached

    def first_byte(self) -> None:
        if not self.is_decoding:
            self.is_decoding = True
            self.replica.num_queued_tokens -= self.num_uncached
            self.replica.num_decoding += 1

    def give_back(self) -> None:
        self.replica.num_in_flight -= 1
        if self.is_decoding:
            self.replica.num_decoding -= 1
        else:
            self.replica.num_queued_tokens -= self.num_uncached


def _cached_tokens(usage) -> Optional[int]:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


class UsageScanner:
    """Finds the usage object in an SSE stream as chunks pass (lines may span chunks)."""

    def __init__(self):
        self._pending = b""
        self.cached_tokens: Optional[int] = None
        self.is_done = False

    def feed(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"data: [DONE]"):
                self.is_done = True
            elif b'"prompt_tokens"' in line and line.startswith(b"data: {"):
                try:
                    cached = _cached_tokens(orjson.loads(line[6:]).get("usage"))
                except orjson.JSONDecodeError:
                    continue
                if cached is not None:
                    self.cached_tokens = cached


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, membership: Membership, metrics: RouterMetrics,
                 config: ProxyConfig):
        self.session, self.membership, self.metrics, self.config = session, membership, metrics, config

    async def forward(self, request: web.Request, raw_body: bytes, num_prompt_tokens: int,
                      candidates: Sequence[Candidate]) -> web.StreamResponse:
        last_error: Optional[APIError] = None
        for attempt, candidate in enumerate(candidates[:self.config.max_attempts]):
            replica = candidate.replica
            load = _Load(replica, max(0, num_prompt_tokens - candidate.num_cached_tokens))
            try:
                outcome = await self._attempt(request, raw_body, candidate, load)
            finally:
                load.give_back()
            if isinstance(outcome, web.StreamResponse):
                return outcome
            last_error = outcome
            if attempt + 1 < min(len(candidates), self.config.max_attempts):
                self.metrics.retries.labels(last_error.code or "error").inc()
        assert last_error is not None
        self.metrics.errors.labels(last_error.code or "error").inc()
        return last_error.response()

    async def _attempt(self, request: web.Request, raw_body: bytes, candidate: Candidate, load: _Load):
        """A response that reached the client, or an APIError when another replica may try."""
        replica = candidate.replica
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s,
                                        sock_read=self.config.read_timeout_s)
        headers = {"Content-Type": "application/json"}
        self.metrics.selections.labels(replica.url).inc()
        self.metrics.predicted_cached_tokens.labels(replica.url).inc(candidate.num_cached_tokens)
        decision = {"X-Kvloom-Replica": replica.url,
                    "X-Kvloom-Cached-Tokens-Predicted": str(candidate.num_cached_tokens)}
        try:
            async with self.session.post(replica.url + request.path, data=raw_body, headers=headers,
                                         timeout=timeout) as upstream:
                if upstream.status in RETRY_STATUSES:
                    body = await upstream.read()
                    if upstream.status == 503:
                        self.membership.record_failure(replica, "answered 503")
                    return _upstream_error(upstream.status, body, replica)
                if upstream.content_type == "text/event-stream":
                    return await self._stream(request, upstream, replica, load, decision)
                body = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            self.membership.record_failure(replica, f"{type(exc).__name__}: {exc}")
            return APIError(502, f"replica {replica.url} failed: {type(exc).__name__}", type="server_error",
                            code="replica_failed")
        load.first_byte()
        self.membership.record_success(replica)
        if upstream.status == 200:
            try:
                self._record_usage(replica, _cached_tokens(orjson.loads(body).get("usage")))
            except (orjson.JSONDecodeError, AttributeError):
                pass
        return web.Response(status=upstream.status, body=body, headers=dict(decision, **{
            "Content-Type": upstream.headers.get("Content-Type", "application/json")}))

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse, replica: Replica,
                      load: _Load, decision: dict) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=dict(
            decision, **{"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}))
        scanner = UsageScanner()
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                load.first_byte()
                scanner.feed(chunk)
                await _write(response, chunk)
            if not scanner.is_done:
                raise aiohttp.ClientPayloadError("the stream ended without [DONE]")
        except UPSTREAM_ERRORS as exc:
            self.membership.record_failure(replica, f"mid-stream: {type(exc).__name__}")
            error = APIError(502, f"replica {replica.url} failed mid-stream: {type(exc).__name__}",
                             type="server_error", code="replica_failed")
            self.metrics.errors.labels("replica_failed").inc()
            try:
                await _write(response, b"\n\ndata: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n")
            except _ClientGone:
                return response
        except _ClientGone:
            return response
        else:
            self.membership.record_success(replica)
            self._record_usage(replica, scanner.cached_tokens)
        await response.write_eof()
        return response

    def _record_usage(self, replica: Replica, cached_tokens: Optional[int]) -> None:
        if cached_tokens is not None:
            self.metrics.actual_cached_tokens.labels(replica.url).inc(cached_tokens)


def _upstream_error(status: int, body: bytes, replica: Replica) -> APIError:
    """The replica's own error envelope, kept for the client if no other replica can answer."""
    try:
        error = orjson.loads(body)["error"]
        message, type_, code = error["message"], error.get("type", "server_error"), error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, type_, code = f"replica {replica.url} answered {status}", "server_error", None
    return APIError(status, message, type=type_, code=code, headers={"Retry-After": "1"})
