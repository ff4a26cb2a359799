"""The measuring tools' HTTP client: one request to an OpenAI-compatible server, timed on the client,
its outcome written into a tools.slo.RequestRecord.

    send_request(session, base_url, spec, rec, timeout_s[, read])
        POST spec.body; a 2xx answer goes to the reader of its kind: an SSE stream (read_stream),
        a /v1/score body (read_score) or a non-streaming completion (read_completion). Every
        failure becomes rec.error, never an exception (but cancellation):
          "http_STATUS[:code]"   an HTTP error, with the code (or type) of OpenAI's error envelope
          "stream_error[:code]"  an error event inside an SSE stream
          "incomplete_stream", "bad_response", "timeout", "connection_error", "client_error"
    request_json(session, method, url[, body]) -> (status or None, JSON object): GETs, admin POSTs
    discover_model: the first model of /v1/models
    base_url(url): a --url as the user gave it -> the server's root

Timing: TTFT is send -> first non-empty content chunk, ITL the gaps between content chunks, e2e
send -> `data: [DONE]` (or the whole body). Output tokens come from the final usage chunk
(stream_options.include_usage) when the server sends one, else the chunk count.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional

import aiohttp
import orjson

from kvloom.tools.command_args import require
from kvloom.tools.slo import RequestRecord
from kvloom.tools.workload import RequestSpec

Reader = Callable[[aiohttp.ClientResponse, RequestRecord, RequestSpec, float], Awaitable[None]]


def base_url(url: str) -> str:
    url = url.rstrip("/")
    require(url.startswith(("http://", "https://")), f"--url: expected http(s)://HOST[:PORT], got {url!r}")
    return url[:-3] if url.endswith("/v1") else url


def error_code(error) -> Optional[str]:
    """The code (else the type) of an OpenAI error object, or None."""
    return (error.get("code") or error.get("type")) if isinstance(error, dict) else None


def _with_code(kind: str, code: Optional[str]) -> str:
    return kind + (f":{code}" if code else "")


async def _http_error(resp: aiohttp.ClientResponse) -> str:
    """"http_STATUS:CODE" from OpenAI's error envelope, or "http_STATUS"."""
    code = None
    try:
        code = error_code((await resp.json(content_type=None)).get("error"))
    except (ValueError, AttributeError, aiohttp.ClientError):
        pass
    return _with_code(f"http_{resp.status}", code)


def sse_data(line: bytes) -> Optional[bytes]:
    """The payload of an SSE `data:` line, else None."""
    line = line.strip()
    return line[5:].strip() if line.startswith(b"data:") else None


def stream_error(event: dict) -> Optional[str]:
    """"stream_error[:code]" when an SSE event carries an error, else None."""
    error = event.get("error")
    return _with_code("stream_error", error_code(error)) if error else None


async def read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, spec: RequestSpec,
                      start: float) -> None:
    chunk_times: list[float] = []
    usage_tokens = None
    buffer = b""
    end = None
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            event = sse_data(line)
            if event is None or end is not None:
                continue
            if event == b"[DONE]":
                end = now
                continue
            obj = orjson.loads(event)
            if not isinstance(obj, dict):
                raise ValueError("an SSE event is not a JSON object")
            rec.error = stream_error(obj)
            if rec.error:
                return
            usage = obj.get("usage")
            if isinstance(usage, dict):
                usage_tokens = usage.get("completion_tokens", usage_tokens)
                rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
            for choice in obj.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunk_times.append(now)
                    break
    if end is None:
        rec.error = "incomplete_stream"
        return
    rec.e2e = end - start
    rec.ttft = chunk_times[0] - start if chunk_times else rec.e2e
    rec.itls = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    rec.output_tokens = usage_tokens if isinstance(usage_tokens, int) else len(chunk_times)


async def _read_body(resp: aiohttp.ClientResponse, rec: RequestRecord, field: str,
                     expected_len: Optional[int], start: float) -> Optional[dict]:
    """A JSON body whose `field` is a non-empty list (of expected_len when given): e2e and prompt
    tokens recorded, the body returned; else rec.error and None."""
    body = await resp.json(content_type=None)
    values = body.get(field) if isinstance(body, dict) else None
    is_ok = isinstance(values,
                       list) and (bool(values) if expected_len is None else len(values) == expected_len)
    if not is_ok:
        rec.error = "bad_response"
        return None
    rec.e2e = time.perf_counter() - start
    usage = body.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.output_tokens = usage.get("completion_tokens") or 0
    return body


async def read_score(resp: aiohttp.ClientResponse, rec: RequestRecord, spec: RequestSpec,
                     start: float) -> None:
    if await _read_body(resp, rec, "scores", spec.num_items, start) is not None:
        rec.num_items = spec.num_items


async def read_completion(resp: aiohttp.ClientResponse, rec: RequestRecord, spec: RequestSpec,
                          start: float) -> None:
    """A non-streaming chat (or text) completion: e2e and the server's token counts."""
    await _read_body(resp, rec, "choices", None, start)


def reader_for(spec: RequestSpec) -> Reader:
    if spec.is_stream:
        return read_stream
    return read_score if spec.path == "/v1/score" else read_completion


async def send_request(session: aiohttp.ClientSession, url: str, spec: RequestSpec, rec: RequestRecord,
                       timeout_s: float, read: Optional[Reader] = None) -> None:
    """POST spec.body to url + spec.path and fill `rec` (see the module docstring); `read` replaces the
    reader of the spec's kind. A request whose kept-alive connection turns out closed before any response
    came (llama-server closes it after each streamed response) is sent once more on a new connection."""
    start = time.perf_counter()
    for attempt in range(2):
        responded = False
        try:
            async with session.post(url + spec.path, data=orjson.dumps(spec.body),
                                    headers={"Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                responded = True
                if resp.status >= 400:
                    rec.error = await _http_error(resp)
                else:
                    await (read or reader_for(spec))(resp, rec, spec, start)
        except asyncio.TimeoutError:  # aiohttp's timeouts subclass it
            rec.error = "timeout"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            if not responded and attempt == 0 and not isinstance(error, aiohttp.ClientConnectorError):
                continue  # a stale kept-alive connection: nothing reached the server
            rec.error = "connection_error"
        except aiohttp.ClientError:
            rec.error = "client_error"
        except (ValueError, TypeError, AttributeError):  # not JSON, or JSON of the wrong shape
            rec.error = "bad_response"
        return


async def request_json(session: aiohttp.ClientSession, method: str, url: str, body: Optional[dict] = None, *,
                       timeout_s: float) -> tuple[Optional[int], dict]:
    """(status, JSON object body, {} when the body is not one) of one request; (None, {}) when there
    is no answer within timeout_s."""
    try:
        async with session.request(method, url, json=body,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            answer = await resp.json(content_type=None)
            return resp.status, answer if isinstance(answer, dict) else {}
    except (asyncio.TimeoutError, aiohttp.ClientError, ValueError):
        return None, {}


async def discover_model(session: aiohttp.ClientSession, url: str, timeout_s: float) -> Optional[str]:
    """The first model of GET /v1/models, or None (the body then names no model)."""
    status, body = await request_json(session, "GET", url + "/v1/models", timeout_s=timeout_s)
    try:
        return body["data"][0]["id"] if status == 200 else None
    except (LookupError, TypeError):
        return None
