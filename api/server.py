"""The OpenAI-compatible HTTP server: an aiohttp application built from an engine.

`create_app(engine)` returns an `aiohttp.web.Application` that shares the
engine's event loop; several apps (and engines) run side by side in one
process. `start_server` binds it (port 0 picks a free port) with handler
cancellation on, so a client that disconnects aborts its requests.
`serve()` is the `kvloom serve` entry: uvloop, the server up at once (so
/health and /ready answer during warm-up), the engine started behind it, and a
bounded drain on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
import uuid
from typing import Optional

import orjson
from aiohttp import web

from kvloom.api import errors
from kvloom.api.errors import APIError
from kvloom.api.http_common import make_error_middleware, read_body, read_json
from kvloom.api.kv_events_route import install_kv_events
from kvloom.api.middleware import access_log_middleware, require_api_key, send_request_id
from kvloom.api.openapi import openapi_spec
from kvloom.api.protocol import (GenerationRequest, TokenizeChatRequest, parse_chat, parse_completion,
                                  parse_detokenize, parse_score, parse_tokenize)
from kvloom.engine.engine import Engine, EngineNotReadyError, EngineState, EngineUnavailableError
from kvloom.engine.request import FinishReason, RequestOutput, Usage, validate_prompt_ids
from kvloom.engine.scheduler import QueueFullError

log = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def _json(data, status: int = 200, headers: Optional[dict] = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json",
                        headers=headers)


error_middleware = make_error_middleware(
    lambda request, code: request.app[ENGINE_KEY].metrics.request_errors.labels(code).inc(),
    lambda request: request.app[MAX_BODY_KEY])
_read_body, _read_json = read_body, read_json


def _check_model(engine: Engine, model: Optional[str]) -> None:
    if model is not None and model not in engine.served_model_names:
        raise errors.model_not_found(model)


def _check_engine(engine: Engine) -> None:
    if engine.state in (EngineState.STARTING, EngineState.WARMING, EngineState.DEGRADED):
        raise errors.not_ready(f"{engine.state.value}: {engine.state_detail}")
    if engine.state is not EngineState.READY:
        raise errors.unavailable(f"{engine.state.value}: {engine.state_detail}")


class _Choice:
    """One generated sequence of a response, accumulated from its stream."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.logprobs: list = []
        self.num_tokens = 0
        self.echoed = False  # echo: the prompt went out, before the first generated text
        self.finish_reason: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.error: Optional[str] = None
        self.error_code: Optional[str] = None


def _finish_reason(out: RequestOutput) -> Optional[str]:
    if not out.finished:
        return None
    return "stop" if out.finish_reason in (FinishReason.STOP, FinishReason.ABORT) else out.finish_reason.value


class Generation:
    """Fans one OpenAI request out into engine requests (prompts x n) and merges their outputs."""

    def __init__(self, engine: Engine, req: GenerationRequest):
        self.engine, self.req = engine, req
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.streams = []
        self.prompt_tokens = 0
        self.prompts: list[tuple[object, list[int]]] = []  # per prompt: (as given, token ids), for echo

    def submit(self) -> None:
        """Encode every prompt once (the engine checks the ids there, and not again when they are queued)
        and queue every choice; errors map to API errors and nothing stays queued."""
        engine, req = self.engine, self.req
        try:
            if req.kind == "chat":
                prompt_ids = [engine.encode_prompt(messages=req.messages)]
            else:
                prompt_ids = [engine.encode_prompt(p) for p in req.prompts]
            for p_index, ids in enumerate(prompt_ids):
                params = req.params_for_prompt(len(ids), engine.max_model_len)
                self.prompt_tokens += len(ids)
                if req.echo:
                    self.prompts.append((req.prompts[p_index], list(ids)))
                for j in range(req.n):
                    p = params
                    if p.seed is not None and j:
                        p = dataclasses.replace(p, seed=p.seed + j)
                    index = p_index * req.n + j
                    stream = engine.generate(ids, p, request_id=f"{self.id}-{index}")
                    self.streams.append((index, stream))
        except BaseException as exc:
            self.abort()
            if isinstance(exc, ValueError):
                if req.kind == "chat" and str(exc).startswith("prompt:"):
                    exc = ValueError("messages" + str(exc)[len("prompt"):])
                raise errors.from_value_error(exc) from None
            if isinstance(exc, QueueFullError):
                raise errors.queue_full(str(exc)) from None
            if isinstance(exc, EngineNotReadyError):
                raise errors.not_ready(str(exc)) from None
            if isinstance(exc, EngineUnavailableError):
                raise errors.unavailable(str(exc)) from None
            raise

    def abort(self) -> None:
        """Abort every choice still running (a no-op for finished ones) and free its pages now."""
        for index, stream in self.streams:
            self.engine.abort(f"{self.id}-{index}")  # a stream never iterated has no cleanup of its own
            asyncio.ensure_future(stream.aclose())
        self.streams = []

    async def merged(self):
        """(choice index, RequestOutput) from every choice, as they come."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, stream):
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            finally:
                queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in self.streams]
        remaining = len(tasks)
        try:
            while remaining:
                index, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield index, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- shaping -------------------------------------------------------------------------------

    def logprobs_chat(self, out: RequestOutput) -> Optional[dict]:
        if self.req.logprobs is None:
            return None
        tok = self.engine.tokenizer
        content = []
        for lp in out.logprobs:
            content.append({
                "token": tok.token_text(lp.token_id), "logprob": lp.logprob,
                "bytes": tok.token_bytes(lp.token_id),
                "top_logprobs": [{"token": tok.token_text(t), "logprob": v, "bytes": tok.token_bytes(t)}
                                 for t, v in lp.top],
            })
        return {"content": content}

    def logprobs_completion(self, entries, offset: int) -> dict:
        """Completions' logprobs of (token id, TokenLogprob or None) pairs; None (a prompt's first token)
        gives null logprobs; text offsets count from `offset`."""
        tok = self.engine.tokenizer
        tokens, values, tops, offsets = [], [], [], []
        for token_id, lp in entries:
            text = tok.token_text(token_id)
            tokens.append(text)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {tok.token_text(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def completion_piece(self, index: int, choice: _Choice, out: RequestOutput) -> tuple[str, Optional[dict]]:
        """The text and logprobs an output adds to a completion choice. With echo, the choice's first output
        brings the prompt first: its text (as given; token ids decoded) and, with logprobs, every prompt
        token's (the first one's null)."""
        text, offset, parts = out.text, len(choice.text), []
        if self.req.echo and not choice.echoed:
            choice.echoed = True
            given, ids = self.prompts[index // self.req.n]
            prompt_text = given if isinstance(given, str) else self.engine.tokenizer.decode(
                ids, skip_special_tokens=False)
            text = prompt_text + text
            if out.prompt_logprobs is not None and self.req.logprobs is not None:
                parts.append(self.logprobs_completion(zip(ids, out.prompt_logprobs), offset))
            offset += len(prompt_text)
        if self.req.logprobs is None:
            return text, None
        parts.append(self.logprobs_completion(((lp.token_id, lp) for lp in out.logprobs), offset))
        return text, _merge_completion_logprobs(parts)

    def running_usage(self, choices) -> dict:
        """The usage so far, while choices are still generating (stream_options.continuous_usage_stats)."""
        completion = sum(c.num_tokens for c in choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def usage(self, choices) -> dict:
        completion = sum(c.usage.completion_tokens for c in choices if c.usage)
        cached = sum(c.usage.cached_tokens for c in choices if c.usage)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    async def full_response(self) -> web.Response:
        choices = {i: _Choice(i) for i, _ in self.streams}
        async for index, out in self.merged():
            c = choices[index]
            if self.req.kind == "chat":
                c.text += out.text
                c.logprobs.extend((self.logprobs_chat(out) or {"content": []})["content"])
            else:
                text, logprobs = self.completion_piece(index, c, out)
                c.text += text
                c.logprobs.append(logprobs)
            if out.finished:
                c.finish_reason, c.usage, c.error, c.error_code = (_finish_reason(out), out.usage, out.error,
                                                                   out.error_code)
        failed = [c for c in choices.values() if c.error]
        if failed:
            raise errors.generation_error(failed[0].error, failed[0].error_code)
        ordered = [choices[i] for i in sorted(choices)]
        base = {"id": self.id, "created": self.created, "model": self.engine.model_name}
        if self.req.kind == "chat":
            body = dict(base, object="chat.completion", choices=[
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": {"content": c.logprobs} if self.req.logprobs is not None else None,
                 "finish_reason": c.finish_reason} for c in ordered])
        else:
            body = dict(base, object="text_completion", choices=[
                {"index": c.index, "text": c.text, "logprobs": _merge_completion_logprobs(c.logprobs),
                 "finish_reason": c.finish_reason} for c in ordered])
        body["usage"] = self.usage(ordered)
        return _json(body)

    async def stream_response(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        chat = self.req.kind == "chat"
        base = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.created, "model": self.engine.model_name}
        choices = {i: _Choice(i) for i, _ in self.streams}

        async def send(choice_list, usage=None):
            chunk = dict(base, choices=choice_list)
            if self.req.include_usage:
                if usage is None and self.req.continuous_usage:
                    usage = self.running_usage(choices.values())
                chunk["usage"] = usage
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        if chat:
            for i in sorted(choices):
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
        error = None
        async for index, out in self.merged():
            c = choices[index]
            if out.error:
                error = errors.generation_error(out.error, out.error_code)
                break
            c.num_tokens += len(out.token_ids)
            if chat and (out.text or out.logprobs):
                await send([{"index": index, "delta": {"content": out.text},
                             "logprobs": self.logprobs_chat(out), "finish_reason": None}])
                c.text += out.text
            elif not chat and (out.text or out.logprobs or (self.req.echo and not c.echoed)):
                text, logprobs = self.completion_piece(index, c, out)
                await send([{"index": index, "text": text, "finish_reason": None, "logprobs": logprobs}])
                c.text += text
            if out.finished:
                c.finish_reason, c.usage = _finish_reason(out), out.usage
                item = ({"index": index, "delta": {}, "logprobs": None,
                         "finish_reason": c.finish_reason} if chat
                        else {"index": index, "text": "", "logprobs": None, "finish_reason": c.finish_reason})
                await send([item])
        if error is not None:
            await response.write(b"data: " + orjson.dumps(error.body()) + b"\n\n")
        elif self.req.include_usage:
            await send([], usage=self.usage([choices[i] for i in sorted(choices)]))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _merge_completion_logprobs(parts: list) -> Optional[dict]:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}


async def _structured_output(engine: Engine) -> None:
    """The engine's structured-output compiler, built by the first request that needs one, so that a schema
    that does not compile is a 400 at submission."""
    try:
        await engine.structured_output()
    except ValueError as exc:
        raise errors.from_value_error(exc) from None
    except EngineNotReadyError as exc:
        raise errors.not_ready(str(exc)) from None


async def _generate(request: web.Request, parse) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    req = parse(await _read_body(request))
    _check_model(engine, req.model)
    _check_engine(engine)
    if req.params.response_format is not None:
        await _structured_output(engine)
    gen = Generation(engine, req)
    gen.submit()
    try:
        if req.stream:
            return await gen.stream_response(request)
        return await gen.full_response()
    finally:
        gen.abort()


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat)


def _model_card(engine: Engine, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(engine.last_ready_at or time.time()),
            "owned_by": "kvloom", "max_model_len": engine.max_model_len if engine.runner else None}


async def list_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    cards = [_model_card(engine, name) for name in engine.served_model_names]
    return _json({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    model = request.match_info["model"]
    _check_model(engine, model)
    return _json(_model_card(engine, model))


async def score(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = parse_score(await _read_body(request))
    _check_model(engine, body.model)
    _check_engine(engine)
    try:
        out = await engine.score(body.query, body.items or [], body.label_token_ids,
                                 apply_softmax=bool(body.apply_softmax), item_first=bool(body.item_first))
    except ValueError as exc:
        raise errors.from_value_error(exc) from None
    except QueueFullError as exc:
        raise errors.queue_full(str(exc)) from None
    except EngineNotReadyError as exc:
        raise errors.not_ready(str(exc)) from None
    except EngineUnavailableError as exc:
        raise errors.unavailable(str(exc)) from None
    return _json({"object": "scoring", "model": engine.model_name, "scores": out.scores,
                  "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}})


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template, to token ids."""
    engine = request.app[ENGINE_KEY]
    body = parse_tokenize(await _read_body(request))
    _check_model(engine, body.model)
    _check_engine(engine)
    tokenizer = engine.tokenizer
    try:
        if isinstance(body, TokenizeChatRequest):
            ids = tokenizer.apply_chat_template(body.messages, body.add_generation_prompt is not False,
                                                add_special_tokens=bool(body.add_special_tokens))
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    except ValueError as exc:
        raise errors.from_value_error(exc) from None
    return _json({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                  "token_strs": tokenizer.token_strings(ids) if body.return_token_strs else None})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: token ids to text, special tokens included."""
    engine = request.app[ENGINE_KEY]
    body = parse_detokenize(await _read_body(request))
    _check_model(engine, body.model)
    _check_engine(engine)
    if body.tokens:
        try:
            validate_prompt_ids(body.tokens, engine.runner.vocab_size, "tokens")
        except ValueError as exc:
            raise errors.from_value_error(exc) from None
    return _json({"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    alive = engine.state not in (EngineState.FAILED, EngineState.STOPPED)
    return _json({"status": "ok" if alive else engine.state.value, "state": engine.state.value},
                 status=200 if alive else 503)


async def ready(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = {"ready": engine.is_ready, "state": engine.state.value, "detail": engine.state_detail}
    return _json(body, status=200 if engine.is_ready else 503,
                 headers=None if engine.is_ready else {"Retry-After": "5"})


async def status(request: web.Request) -> web.Response:
    return _json(request.app[ENGINE_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[ENGINE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_spec(request.app[ENGINE_KEY].model_name))


async def admin_restart(request: web.Request) -> web.Response:
    """Rebuild the engine in place (off unless the app was built with enable_admin)."""
    engine = request.app[ENGINE_KEY]
    try:
        await engine.restart()
    except RuntimeError as exc:
        raise APIError(409, str(exc), code="restart_refused") from None
    return _json(engine.status(), status=200 if engine.is_ready else 503)


async def admin_faults(request: web.Request) -> web.Response:
    """Arm a fault: {"kind": ..., "after_steps": N, "request_id": ...}, or {"kind": "clear"}."""
    engine = request.app[ENGINE_KEY]
    if engine.faults is None:
        raise APIError(404, "fault injection is off (start with --enable-fault-injection)", code="not_found")
    body = await _read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        raise errors.invalid("kind", "required: a fault kind or \"clear\"", "missing_field")
    if body["kind"] == "clear":
        engine.faults.clear()
    else:
        after = body.get("after_steps", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise errors.invalid("after_steps", "must be a non-negative integer", "invalid_type")
        try:
            engine.faults.arm(body["kind"], after, body.get("request_id"))
        except ValueError as exc:
            raise errors.from_value_error(exc) from None
    return _json({"armed": body["kind"], "fired": engine.faults.num_fired})


ROUTES = (
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/score", score),
    ("POST", "/v1/tokenize", tokenize),
    ("POST", "/v1/detokenize", detokenize),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model}", get_model),
    ("GET", "/health", health),
    ("GET", "/ready", ready),
    ("GET", "/status", status),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi),
)
ADMIN_ROUTES = (("POST", "/admin/restart", admin_restart), ("POST", "/admin/faults", admin_faults))


def create_app(engine: Engine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, enable_admin: bool = False,
               api_key: Optional[str] = None, access_log: bool = True) -> web.Application:
    """The app for `engine`. enable_admin adds POST /admin/restart and, when the engine has a fault
    injector, POST /admin/faults. With an api_key, every route but /health, /ready and /metrics needs
    `Authorization: Bearer <api_key>`. access_log: one INFO line per request on `kvloom.access`."""
    middlewares = [access_log_middleware(access_log), error_middleware]
    if api_key:
        middlewares.append(require_api_key(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app.on_response_prepare.append(send_request_id)
    app[ENGINE_KEY] = engine
    app[MAX_BODY_KEY] = max_body_bytes
    for method, path, handler in ROUTES + (ADMIN_ROUTES if enable_admin else ()):
        if method == "GET":
            app.router.add_get(path, handler)  # HEAD too, as probes expect
        else:
            app.router.add_route(method, path, handler)
    install_kv_events(app, lambda a: a[ENGINE_KEY].kv_events)  # the router's feed of cache changes
    return app


async def start_server(app: web.Application, host: str = "127.0.0.1", port: int = 0):
    """Bind `app`; returns (runner, base_url). Clean up with `await runner.cleanup()`."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets  # the bound port, when 0 was asked for
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"http://{host}:{bound}"


async def serve(engine: Engine, host: str, port: int, drain_timeout: float = 30.0,
                enable_admin: bool = False, api_key: Optional[str] = None, access_log: bool = True,
                command_started: Optional[float] = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests (bounded) and stop. `command_started`
    (time.monotonic() when the command began) adds the time before the engine's start to the ready line."""
    app = create_app(engine, enable_admin=enable_admin, api_key=api_key, access_log=access_log)
    runner, url = await start_server(app, host, port)
    log.info("kvloom listening on %s (model %s)", url, engine.config.model or "default")
    print(f"kvloom: listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.ensure_future(engine.start())
    try:
        done, _ = await asyncio.wait({start, asyncio.ensure_future(stop.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            start.result()  # a load failure ends the process with its error
            timing = engine.start_summary()
            if timing and command_started is not None:
                timing += f"; {time.monotonic() - command_started:.1f}s since the command started"
            print(f"kvloom: {engine.state.value} ({engine.state_detail}){' ' + timing if timing else ''}",
                  flush=True)
            await stop.wait()
        print("kvloom: draining", flush=True)
        await engine.drain(drain_timeout)
    finally:
        if not start.done():
            start.cancel()
        await engine.stop()
        await runner.cleanup()
