"""OpenAI request bodies -> validated generation requests.

Strict by design: unknown fields, wrong JSON types and out-of-range values are
rejected with a 400 naming the field, so a client learns at once what the
server did not understand instead of getting a silently different answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from kvloom.api.errors import from_value_error, invalid
from kvloom.engine.request import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16
MAX_STOP = 8

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "presence_penalty", "frequency_penalty", "user", "logit_bias",
           # extensions
           "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                         "tools", "tool_choice", "parallel_tool_calls"}

_MISSING = object()


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Body:
    """Typed access to a request object; every failure names its field."""

    def __init__(self, body: Any, allowed: set[str]):
        if not isinstance(body, dict):
            raise invalid(None, f"the request body must be a JSON object, got {_type_name(body)}", "invalid_body")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise invalid(unknown[0], "unknown field", "unknown_field")
        self.body = body

    def get(self, name: str, kind: str, default=None, *, low=None, high=None, nullable=True):
        value = self.body.get(name, _MISSING)
        if value is _MISSING or (value is None and nullable):
            return default
        checks = {"int": _is_int, "number": _is_number, "bool": lambda v: isinstance(v, bool),
                  "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict)}
        if not checks[kind](value):
            want = {"int": "an integer", "number": "a finite number", "bool": "a boolean", "str": "a string",
                    "dict": "an object"}[kind]
            raise invalid(name, f"must be {want}, got {_type_name(value)}", "invalid_type")
        if low is not None and value < low:
            raise invalid(name, f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise invalid(name, f"must be <= {high}, got {value}")
        return value

    def unsupported_unless(self, name: str, allowed_values: tuple) -> None:
        value = self.body.get(name)
        if value is not None and value not in allowed_values:
            raise invalid(name, "is not supported by this server", "unsupported")


@dataclass
class GenerationRequest:
    kind: str  # "completion" or "chat"
    model: Optional[str]
    prompts: list[Union[str, list[int]]] = field(default_factory=list)  # completions
    messages: Optional[list] = None  # chat
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = True
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # top alternatives wanted; None: no logprobs


def _stop(b: _Body) -> tuple[str, ...]:
    value = b.body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise invalid("stop", f"must be a string or an array of strings, got {_type_name(value)}", "invalid_type")
    if len(value) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop strings, got {len(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise invalid(f"stop[{i}]", "must be a non-empty string")
    return tuple(value)


def _int_list(name: str, value) -> list[int]:
    if not isinstance(value, list):
        raise invalid(name, f"must be an array of integers, got {_type_name(value)}", "invalid_type")
    for i, t in enumerate(value):
        if not _is_int(t):
            raise invalid(f"{name}[{i}]", f"must be an integer, got {_type_name(t)}", "invalid_type")
    return value


def _prompts(value) -> list[Union[str, list[int]]]:
    if value is None or value is _MISSING:
        raise invalid("prompt", "is required", "missing_field")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise invalid("prompt", "must not be empty")
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_int(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) for p in value):
            return [_int_list(f"prompt[{i}]", p) for i, p in enumerate(value)]
    raise invalid("prompt", "must be a string, an array of strings, an array of token ids or an array of "
                            "token id arrays", "invalid_type")


def _sampling(b: _Body, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    stop_ids = b.body.get("stop_token_ids")
    b.unsupported_unless("logit_bias", ({},))
    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else 16,
            temperature=b.get("temperature", "number", 1.0, low=0.0, high=2.0),
            top_p=b.get("top_p", "number", 1.0, low=0.0, high=1.0),
            top_k=max(0, b.get("top_k", "int", 0, low=-1, high=2**31 - 1)),  # -1 and 0 both mean no top-k
            min_p=b.get("min_p", "number", 0.0, low=0.0, high=1.0),
            repetition_penalty=b.get("repetition_penalty", "number", 1.0, low=0.0),
            frequency_penalty=b.get("frequency_penalty", "number", 0.0, low=-2.0, high=2.0),
            presence_penalty=b.get("presence_penalty", "number", 0.0, low=-2.0, high=2.0),
            seed=b.get("seed", "int", None, low=0),
            stop=_stop(b),
            stop_token_ids=tuple(_int_list("stop_token_ids", stop_ids)) if stop_ids is not None else (),
            ignore_eos=b.get("ignore_eos", "bool", False),
            logprobs=logprobs,
        )
    except ValueError as exc:
        raise from_value_error(exc) from None


def _common(b: _Body, req: GenerationRequest) -> None:
    req.model = b.get("model", "str")
    req.n = b.get("n", "int", 1, low=1, high=MAX_N)
    req.stream = b.get("stream", "bool", False)
    options = b.get("stream_options", "dict")
    if options is not None:
        if not req.stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise invalid(f"stream_options.{unknown[0]}", "unknown field", "unknown_field")
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise invalid("stream_options.include_usage", "must be a boolean", "invalid_type")
        req.include_usage = include
    b.get("user", "str")


def parse_completion(body: Any) -> GenerationRequest:
    b = _Body(body, COMPLETION_FIELDS)
    req = GenerationRequest(kind="completion", model=None)
    _common(b, req)
    req.prompts = _prompts(b.body.get("prompt", _MISSING))
    if b.get("echo", "bool", False):
        raise invalid("echo", "is not supported by this server", "unsupported")
    b.unsupported_unless("suffix", ("",))
    best_of = b.get("best_of", "int", None, low=1)
    if best_of is not None and best_of != req.n:
        raise invalid("best_of", "is only supported equal to n", "unsupported")
    req.logprobs = b.get("logprobs", "int", None, low=0, high=MAX_TOP_LOGPROBS)
    max_tokens = b.get("max_tokens", "int", None, low=1)
    req.max_tokens_given = max_tokens is not None
    req.params = _sampling(b, max_tokens, req.logprobs)
    return req


def parse_chat(body: Any) -> GenerationRequest:
    b = _Body(body, CHAT_FIELDS)
    req = GenerationRequest(kind="chat", model=None)
    _common(b, req)
    messages = b.body.get("messages")
    if messages is None:
        raise invalid("messages", "is required", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty array of messages")
    req.messages = messages
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if b.body.get(name) is not None:
            raise invalid(name, "is not supported by this server", "unsupported")
    fmt = b.get("response_format", "dict")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("response_format", "only {\"type\": \"text\"} is supported", "unsupported")
    want_logprobs = b.get("logprobs", "bool", False)
    top = b.get("top_logprobs", "int", None, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "requires logprobs to be true")
    req.logprobs = (top or 0) if want_logprobs else None
    max_tokens = b.get("max_completion_tokens", "int", None, low=1)
    if max_tokens is None:
        max_tokens = b.get("max_tokens", "int", None, low=1)
    req.max_tokens_given = max_tokens is not None
    req.params = _sampling(b, max_tokens, req.logprobs)
    return req
