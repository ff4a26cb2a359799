"""Requests, their sampling parameters and their outputs.

A `Request` is the only owner of a request's tokens and state, and only the
event loop thread mutates it (the scheduler, through `apply`); the compute
thread sees immutable `ScheduledRow` snapshots. `version` changes whenever the
request's computed state is thrown away (preemption), so a result computed
from an older snapshot is recognised as stale and dropped.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 256  # entries of one request's logit_bias
LOGIT_BIAS_LIMIT = 100.0  # each bias lies in [-100, 100], as OpenAI's
MAX_STOP_TOKEN_IDS = 64


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the caller went away or asked to stop
    ERROR = "error"  # the engine failed; `Request.error` says why


def _check_number(name: str, value, *, low=None, high=None, low_open=False, integer=False):
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (integer and not isinstance(value, int))):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}: must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value!r}")


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output, as OpenAI's response_format: the output is one JSON object, of any shape
    (`json_object()`) or an instance of a JSON schema (`json_schema(schema)`), written with ", " and ": "
    separators and no other whitespace between tokens of JSON. The engine compiles it against the
    vocabulary (`engine.grammar`) when the request is submitted; a schema it cannot compile is refused
    there, with `field` named (before the engine's compiler is built, by the request's stream:
    `Engine.structured_output()`). The output can still be cut short by max_tokens or a stop string."""

    type: str  # "json_object" or "json_schema"
    schema: str = '{"type": "object"}'  # the JSON schema, as JSON text (key order is the output's)

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema) -> "ResponseFormat":
        """`schema`: a dict, or its JSON text."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    def __post_init__(self):
        if self.type not in ("json_object", "json_schema"):
            raise ValueError(f"response_format.type: must be json_object or json_schema, got {self.type!r}")
        if self.type == "json_object" and self.schema != '{"type": "object"}':
            raise ValueError("response_format: a json_object format takes no schema")
        if not isinstance(self.schema, str):
            raise ValueError(f"{self.field}: must be JSON text, got {type(self.schema).__name__}")
        try:
            parsed = json.loads(self.schema)
        except ValueError as exc:
            raise ValueError(f"{self.field}: not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{self.field}: must be a JSON object, got {type(parsed).__name__}")

    @property
    def field(self) -> str:
        """The request field that holds the schema (OpenAI's path), named in errors."""
        return "response_format.json_schema.schema" if self.type == "json_schema" else "response_format"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    logit_bias {token id: bias} is added to the logits before sampling (+100 all but forces a token,
    -100 all but bans it); min_tokens bans the end-of-sequence and stop token ids until that many
    tokens are out. skip_special_tokens and include_stop_str_in_output shape the text only.
    prompt_logprobs scores the prompt itself (what evaluation harnesses ask for); with it, max_tokens
    may be 0: the prompt is computed and scored, and nothing is generated.
    response_format constrains the output to JSON (`ResponseFormat`); such a request ends when its JSON is
    complete, so it takes neither ignore_eos nor min_tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: no logprobs; k: the sampled token's and the top-k alternatives
    # None: none; k: each prompt token's logprob given the tokens before it, and the top-k alternatives
    prompt_logprobs: Optional[int] = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted; a dict is accepted too
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: Optional[ResponseFormat] = None

    def __post_init__(self):
        _check_number("max_tokens", self.max_tokens, low=0, integer=True)
        if self.prompt_logprobs is not None:
            _check_number("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_TOP_LOGPROBS, integer=True)
        elif self.max_tokens == 0:
            raise ValueError("max_tokens: must be >= 1 (0, scoring the prompt only, needs prompt_logprobs)")
        _check_number("min_tokens", self.min_tokens, low=0, integer=True)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_number("temperature", self.temperature, low=0.0, high=100.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("top_k", self.top_k, low=0, high=2**31 - 1, integer=True)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, high=100.0, low_open=True)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_number("seed", self.seed, low=0, high=2**63 - 1, integer=True)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(f"stop_token_ids: must be a list of integers, got {self.stop_token_ids!r}")
        for i, t in enumerate(self.stop_token_ids):
            _check_number(f"stop_token_ids[{i}]", t, low=0, integer=True)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _normalized_logit_bias(self.logit_bias))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a boolean, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, low=0, high=MAX_TOP_LOGPROBS, integer=True)
        if self.response_format is not None:
            if not isinstance(self.response_format, ResponseFormat):
                raise ValueError(f"response_format: must be a ResponseFormat, got {self.response_format!r}")
            if self.ignore_eos:
                raise ValueError("ignore_eos: cannot be true with response_format (a structured output ends "
                                 "when its JSON is complete)")
            if self.min_tokens:
                raise ValueError("min_tokens: is not supported with response_format (a structured output "
                                 "ends when its JSON is complete)")

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids that index the logits must lie in the vocabulary (the engine calls this)."""
        for token, _ in self.logit_bias:
            if token >= vocab_size:
                raise ValueError(f"logit_bias.{token}: token id {token} is outside the vocabulary "
                                 f"[0, {vocab_size})")

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)


def _normalized_logit_bias(value) -> tuple[tuple[int, float], ...]:
    if not value:
        return ()
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, (tuple, list)):
        raise ValueError(f"logit_bias: must map token ids to biases, got {value!r}")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(pairs)}")
    out = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"logit_bias: must map token ids to biases, got {pair!r}")
        token, bias = pair
        _check_number("logit_bias", token, low=0, integer=True)
        _check_number(f"logit_bias.{token}", bias, low=-LOGIT_BIAS_LIMIT, high=LOGIT_BIAS_LIMIT)
        if token in out:
            raise ValueError(f"logit_bias.{token}: given twice")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    """What one step brought a request: the new text and token ids, and the finish when it came."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: Optional[FinishReason] = None
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    usage: Optional[Usage] = None
    error: Optional[str] = None
    # "engine_unavailable" (the engine failed) or "request_failed" (this one only)
    error_code: Optional[str] = None
    label_logprobs: Optional[tuple] = None  # a finished scoring request: per item, the labels' logprobs
    # Once, in the first output after the whole prompt is computed (params.prompt_logprobs set): one entry
    # per prompt token, None for the first (nothing precedes it).
    prompt_logprobs: Optional[tuple[Optional[TokenLogprob], ...]] = None


@dataclass(eq=False)
class ScoreTask:
    """A scoring request's work: after its prompt (the query) is computed, each item is scored, in order,
    by score steps of the task's `mode` ("batched" or "packed"). With no items, the prompt's own last token
    is scored (the single-item path). Only `Scheduler.apply` records results."""

    items: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]
    mode: str = "single"
    label_logprobs: list = field(default_factory=list)  # per item, set as results come back
    num_scored: int = 0  # items [0, num_scored) have their results

    def __post_init__(self):
        self.label_logprobs = [None] * max(1, len(self.items))

    @property
    def is_done(self) -> bool:
        return self.num_scored == len(self.label_logprobs)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0  # the resolved sampling seed
    arrival_time: float = field(default_factory=time.monotonic)
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # params.prompt_logprobs set: the logprobs of prompt tokens 1, 2, ... as their chunks are computed; kept
    # across preemption (a recomputed chunk adds nothing), emitted once when complete
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_emitted: bool = False
    num_computed_tokens: int = 0  # tokens of all_ids whose KV is in `pages`
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    pages: list[int] = field(default_factory=list)
    prefix_node: object = None  # the locked radix node, if any
    version: int = 0
    num_preemptions: int = 0
    finish_reason: Optional[FinishReason] = None
    stop_reason: Optional[object] = None
    error: Optional[str] = None
    error_code: Optional[str] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    last_emit_time: Optional[float] = None
    score: Optional[ScoreTask] = None  # set for scoring requests, which never decode
    # Set by the engine: per-request text state (detokenizer, stop matcher, grammar matcher).
    detokenizer: object = None
    stop_matcher: object = None
    grammar: object = None  # engine.grammar.GrammarMatcher of a structured output; advanced only by apply
    num_emitted_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return tuple(self.prompt_ids[start:n]) + tuple(self.output_ids[max(0, start - n):end - n])

    @property
    def all_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + tuple(self.output_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def has_all_prompt_logprobs(self) -> bool:
        return len(self.prompt_logprobs) == len(self.prompt_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > (0 if self.score is not None else 1)

    @property
    def is_decoding(self) -> bool:
        return self.score is None and self.state is RequestState.RUNNING and not self.is_prefilling

    @property
    def has_items_to_score(self) -> bool:
        return (self.score is not None and self.state is RequestState.RUNNING and not self.is_prefilling
                and self.score.num_scored < len(self.score.items))

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first num_output_tokens output tokens (a verify step can bring tokens past the one
        that ends the request): their logprobs with them, and no computed KV claimed past the tokens."""
        del self.output_ids[num_output_tokens:]
        del self.output_logprobs[num_output_tokens:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.output_ids), self.num_cached_tokens)


class PromptIds(tuple):
    """Token ids already checked against a vocabulary of `vocab_size`: checking them again is a no-op."""

    vocab_size: int

    def __new__(cls, ids, vocab_size: int):
        self = super().__new__(cls, ids)
        self.vocab_size = vocab_size
        return self


def validate_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, field_name: str = "prompt") -> PromptIds:
    if isinstance(prompt_ids, PromptIds) and prompt_ids.vocab_size == vocab_size:
        return prompt_ids
    if len(prompt_ids) == 0:
        raise ValueError(f"{field_name}: must not be empty")
    out = []
    for i, t in enumerate(prompt_ids):
        if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
            raise ValueError(f"{field_name}[{i}]: token ids must be integers, got {t!r}")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field_name}[{i}]: token id {t} is outside the vocabulary [0, {vocab_size})")
        out.append(t)
    return PromptIds(out, vocab_size)
