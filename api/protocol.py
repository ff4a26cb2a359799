"""Request bodies: one pydantic model per request type, the single definition behind both the
validation and the OpenAPI document (`api/openapi.py` renders these models).

Data flow: the raw body bytes -> `Model.model_validate_json` (JSON parsing, types, ranges and unknown
fields in one pass, strict: no coercion of "5" to 5 or of true to 1) -> the handler's plain request
(`GenerationRequest`, `ScoreRequest`, ...) with the engine's `SamplingParams` built once here. A
`ValidationError` becomes one 400 in OpenAI's envelope naming its field (`error.param`, and the
message starts with it); an unknown field is reported first, so a typo is never silently ignored.

What each field does, and which are accepted with no effect or refused, is `api/FIELDS.md`.
Checks that need the model (token ids inside the vocabulary, messages rendered by the chat
template, a prompt that fits the context) are the engine's, once, when the server encodes the prompt.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PlainValidator, Tag,
                      TypeAdapter, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from kvloom.api.errors import APIError, from_value_error, invalid
from kvloom.engine.request import (LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS,
                                   ResponseFormat, SamplingParams)
from kvloom.engine.tokenizer import CHAT_ROLES

MAX_N = 16
MAX_STOP = 8
NO_EFFECT = "Accepted; no effect on this server."


# ---- building blocks -------------------------------------------------------------------------------

def _refuse(code: str, message: str, param: Optional[str] = None):
    """A validation failure with our own code (and, from a model-level check, the field it names)."""
    return PydanticCustomError(code, message, {"param": param} if param else None)


def _integral(v):
    """JSON Schema's integer, which the document promises: any number without a fractional part (1.0 is 1)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


Int = Annotated[int, BeforeValidator(_integral)]


def _one_of(*tagged, tag_of, message: str):
    """A union whose member is picked from the value's JSON shape (tags start with "<", so an error
    inside the member keeps a clean field path such as prompt[1][1]); any other shape is a type error."""
    return Annotated[Union[tuple(Annotated[t, Tag(name)] for name, t in tagged)],
                     Discriminator(tag_of, custom_error_type="invalid_type", custom_error_message=message)]


def _supported_only(schema_type, is_supported, message: str = "is not supported by this server"):
    """A field accepted only with the values `schema_type` documents; any other value is refused with
    code "unsupported" (the field exists in OpenAI's API, the server cannot honour it)."""
    def check(value):
        if value is not None and not is_supported(value):
            raise _refuse("unsupported", message)
        return value
    return Optional[Annotated[Any, PlainValidator(check, json_schema_input_type=schema_type)]]


def _string_item(value):
    if not isinstance(value, str):
        raise _refuse("invalid_value", "must be a non-empty string")
    return value


TokenId = Annotated[Int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
StopString = Annotated[str, BeforeValidator(_string_item), Field(min_length=1)]


def _text_or_list(v):
    return "<string>" if isinstance(v, str) else "<array>" if isinstance(v, list) else None


Stop = _one_of(("<string>", StopString), ("<array>", Annotated[list[StopString], Field(max_length=MAX_STOP)]),
               tag_of=_text_or_list, message="must be a string or an array of strings")


def _prompt_form(v):
    if isinstance(v, str):
        return "<text>"
    if isinstance(v, list):
        if not v or all(_is_int(t) for t in v):
            return "<token ids>"
        if all(isinstance(p, str) for p in v):
            return "<texts>"
        if all(isinstance(p, list) for p in v):
            return "<token id lists>"
    return None


Prompt = _one_of(("<text>", NonEmptyText),
                 ("<texts>", Annotated[list[NonEmptyText], Field(min_length=1)]),
                 ("<token ids>", TokenIds),
                 ("<token id lists>", Annotated[list[TokenIds], Field(min_length=1)]),
                 tag_of=_prompt_form, message="must be a string, an array of strings, an array of token ids "
                                              "or an array of token id arrays")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message, as the engine's chat template takes it (validated there, once, when rendered)."""

    model_config = ConfigDict(extra="allow")
    role: Literal[tuple(sorted(CHAT_ROLES))]
    content: Union[str, list[TextPart]]


def _messages(value):
    if not isinstance(value, list) or not value:
        raise _refuse("invalid_value", "must be a non-empty array of messages")
    return value


Messages = Annotated[list, PlainValidator(_messages, json_schema_input_type=Annotated[
    list[ChatMessage], Field(min_length=1)])]


class StreamOptions(_Strict):
    include_usage: Optional[bool] = Field(None, description="A last chunk: the usage of the whole request.")
    continuous_usage_stats: Optional[bool] = Field(
        None, description="vLLM extension: with include_usage, every chunk carries the usage so far.")
    include_obfuscation: Optional[bool] = Field(None, description=NO_EFFECT)


class JsonSchemaSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        description="The schema's name (letters, digits, _ and -, at most 64).")
    description: Optional[str] = Field(None, description=NO_EFFECT)
    schema_: Optional[dict[str, Any]] = Field(
        None, alias="schema", description="A JSON schema (an object); the output is an instance of it. "
                                          "Absent: any JSON object.")
    strict: Optional[bool] = Field(None, description="Always enforced on this server.")


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormatField = _one_of(
    ("<text>", TextFormat), ("<json_object>", JsonObjectFormat), ("<json_schema>", JsonSchemaFormat),
    tag_of=lambda v: f"<{v.get('type')}>" if isinstance(v, dict) and v.get("type") in (
        "text", "json_object", "json_schema") else None,
    message='must be an object with "type" text, json_object or json_schema')
RESPONSE_FORMAT_DOC = (
    "Structured output. json_object: the output is one JSON object; json_schema: an instance of "
    "json_schema.schema. JSON is written with \", \" and \": \" separators and no other whitespace. The "
    "output always parses unless it is cut short: by max_tokens (then finish_reason is \"length\" and the "
    "JSON may be incomplete) or by a stop string. A schema this server cannot compile is a 400 naming "
    "response_format.json_schema.schema.")


LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")],
                           Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]],
                      Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False})]


# ---- generation ------------------------------------------------------------------------------------

class _Generation(_Strict):
    """The fields /v1/completions and /v1/chat/completions share. null means "not given"."""

    model: Optional[str] = None
    max_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    n: Optional[Annotated[Int, Field(ge=1, le=MAX_N)]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Stop] = None
    seed: Optional[Annotated[Int, Field(ge=0, le=2**63 - 1)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    logit_bias: Optional[LogitBias] = Field(None, description="{token id: bias in [-100, 100]}, added to the "
                                                              "logits before sampling.")
    user: Optional[str] = Field(None, description=NO_EFFECT)
    # vLLM / SGLang sampling extensions
    top_k: Optional[Annotated[Int, Field(ge=-1, le=2**31 - 1)]] = Field(None, description="-1 or 0: off.")
    min_p: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0, le=100)]] = None
    min_tokens: Optional[Annotated[Int, Field(ge=0)]] = Field(
        None, description="No end-of-sequence or stop token id before this many tokens.")
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    response_format: Optional[ResponseFormatField] = Field(None, description=RESPONSE_FORMAT_DOC)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _refuse("invalid_value", "is only allowed when stream is true", "stream_options")
        return self


class CompletionRequest(_Generation):
    prompt: Prompt
    max_tokens: Optional[Annotated[Int, Field(ge=0)]] = Field(
        None, description="0 only with echo: the prompt alone, scored (with logprobs), nothing generated.")
    logprobs: Optional[Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    echo: Optional[bool] = Field(
        None, description="The prompt before the completion, in the text and, with logprobs, in the "
                          "logprobs: each prompt token's logprob given the tokens before it (null for the "
                          "first).")
    best_of: Optional[Annotated[Int, Field(ge=1)]] = Field(None, description="Only equal to n.")
    suffix: _supported_only(Literal[""], lambda v: v == "") = None

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise _refuse("unsupported", "is only supported equal to n", "best_of")
        return self

    @model_validator(mode="after")
    def _no_tokens_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise _refuse("invalid_value", "must be >= 1 unless echo is true (0 with echo returns the prompt "
                                           "alone)", "max_tokens")
        return self


class ChatCompletionRequest(_Generation):
    messages: Messages
    max_completion_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    tools: _supported_only(Annotated[list, Field(max_length=0)], lambda v: v == []) = None
    tool_choice: _supported_only(Literal["none"], lambda v: v == "none") = None
    functions: _supported_only(Annotated[list, Field(max_length=0)], lambda v: v == []) = None
    function_call: _supported_only(Literal["none"], lambda v: v == "none") = None
    modalities: _supported_only(list[Literal["text"]], lambda v: v == ["text"]) = None
    audio: _supported_only(None, lambda v: False) = None
    reasoning_effort: _supported_only(None, lambda v: False) = None
    verbosity: _supported_only(None, lambda v: False) = None
    web_search_options: _supported_only(None, lambda v: False) = None
    parallel_tool_calls: Optional[bool] = Field(None, description=NO_EFFECT + " (no tools)")
    prediction: Optional[dict] = Field(None, description=NO_EFFECT + " (predicted outputs only save time)")
    metadata: Optional[dict[str, str]] = Field(None, description=NO_EFFECT)
    store: Optional[bool] = Field(None, description=NO_EFFECT)
    service_tier: Optional[str] = Field(None, description=NO_EFFECT)
    prompt_cache_key: Optional[str] = Field(None, description=NO_EFFECT + " (the prefix cache is automatic)")
    safety_identifier: Optional[str] = Field(None, description=NO_EFFECT)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _refuse("invalid_value", "requires logprobs to be true", "top_logprobs")
        return self


@dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request, as the server runs it."""

    kind: str  # "completion" or "chat"
    model: Optional[str]
    prompts: list[Union[str, list[int]]] = field(default_factory=list)  # completions
    messages: Optional[list] = None  # chat
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = True
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # usage in every chunk
    logprobs: Optional[int] = None  # top alternatives wanted; None: no logprobs
    echo: bool = False  # completions: the prompt before the completion (and its logprobs)

    def params_for_prompt(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """A chat request without max_tokens may run to the end of the context."""
        if self.max_tokens_given or self.kind != "chat":
            return self.params
        return dataclasses.replace(self.params, max_tokens=max(1, max_model_len - num_prompt_tokens))


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                    "presence_penalty", "seed", "min_tokens", "ignore_eos", "skip_special_tokens",
                    "include_stop_str_in_output")


def _sampling(body: _Generation, max_tokens: Optional[int], logprobs: Optional[int], kind: str,
              prompt_logprobs: Optional[int]) -> SamplingParams:
    given = {name: value for name in _SAMPLING_FIELDS if (value := getattr(body, name)) is not None}
    if given.get("top_k") == -1:
        given["top_k"] = 0  # -1 and 0 both mean no top-k
    if max_tokens is None:  # completions default to OpenAI's 16; chat runs to the context end (later)
        max_tokens = 16 if kind == "completion" else max(16, given.get("min_tokens", 0))
    stop = body.stop
    try:
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
            response_format=_response_format(body.response_format),
            **given)
    except ValueError as exc:
        raise from_value_error(exc) from None


def _response_format(value) -> Optional[ResponseFormat]:
    if isinstance(value, JsonSchemaFormat) and value.json_schema.schema_ is not None:
        return ResponseFormat.json_schema(value.json_schema.schema_)
    if isinstance(value, (JsonObjectFormat, JsonSchemaFormat)):  # a json_schema without a schema: any object
        return ResponseFormat.json_object()
    return None  # text


def _generation(body: _Generation, req: GenerationRequest, max_tokens: Optional[int]) -> GenerationRequest:
    options = body.stream_options
    req.model, req.n, req.stream = body.model, body.n or 1, bool(body.stream)
    req.include_usage = bool(options and options.include_usage)
    req.continuous_usage = req.include_usage and bool(options.continuous_usage_stats)
    req.max_tokens_given = max_tokens is not None
    # echo with logprobs scores the prompt; echo with max_tokens 0 computes it even without (nothing else
    # runs then)
    prompt_logprobs = None
    if req.echo:
        prompt_logprobs = req.logprobs if req.logprobs is not None else 0 if max_tokens == 0 else None
    req.params = _sampling(body, max_tokens, req.logprobs, req.kind, prompt_logprobs)
    return req


def parse_completion(raw: bytes) -> GenerationRequest:
    body = _validate(CompletionRequest, raw)
    prompt = body.prompt
    prompts = [prompt] if isinstance(prompt, str) or _is_int(prompt[0]) else list(prompt)
    req = GenerationRequest(kind="completion", model=None, prompts=prompts, logprobs=body.logprobs,
                            echo=bool(body.echo))
    return _generation(body, req, body.max_tokens)


def parse_chat(raw: bytes) -> GenerationRequest:
    body = _validate(ChatCompletionRequest, raw)
    req = GenerationRequest(kind="chat", model=None, messages=body.messages,
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _generation(body, req, max_tokens)


# ---- scoring and tokenizer endpoints ---------------------------------------------------------------

def _items_form(v):
    if isinstance(v, str):
        return "<text>"
    if isinstance(v, list):
        if all(isinstance(p, str) for p in v):
            return "<texts>"
        if all(isinstance(p, list) for p in v):
            return "<token id lists>"
    return None


ScoreItems = _one_of(("<text>", str), ("<texts>", list[str]), ("<token id lists>", list[list[TokenId]]),
                     tag_of=_items_form,
                     message="must be a string, an array of strings or an array of token id arrays")


class ScoreRequest(_Strict):
    """/v1/score (SGLang's shape): scores[i][j] = P(label_token_ids[j] | query ++ items[i])."""

    model: Optional[str] = None
    query: _one_of(("<string>", NonEmptyText), ("<array>", TokenIds), tag_of=_text_or_list,
                   message="must be a string or an array of token ids")
    items: Optional[ScoreItems] = None
    label_token_ids: TokenIds
    apply_softmax: Optional[bool] = None
    item_first: Optional[bool] = None


class TokenizeCompletionRequest(_Strict):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: Optional[bool] = Field(None, description="Default true.")
    return_token_strs: Optional[bool] = None


class TokenizeChatRequest(_Strict):
    model: Optional[str] = None
    messages: Messages
    add_generation_prompt: Optional[bool] = Field(None, description="Default true.")
    add_special_tokens: Optional[bool] = Field(None, description="Default false: the template writes them.")
    return_token_strs: Optional[bool] = None


# vLLM's /tokenize: a body with "messages" is a chat request, any other a prompt
TokenizeRequest = TypeAdapter(Annotated[
    Union[Annotated[TokenizeChatRequest, Tag("<chat>")],
          Annotated[TokenizeCompletionRequest, Tag("<prompt>")]],
    Discriminator(lambda v: "<chat>" if isinstance(v, dict) and "messages" in v else "<prompt>")])


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[TokenId]


def parse_score(raw: bytes) -> ScoreRequest:
    return _validate(ScoreRequest, raw)


def parse_tokenize(raw: bytes) -> Union[TokenizeChatRequest, TokenizeCompletionRequest]:
    return _validate(TokenizeRequest, raw)


def parse_detokenize(raw: bytes) -> DetokenizeRequest:
    return _validate(DetokenizeRequest, raw)


# ---- validation errors -> one 400 naming the field ---------------------------------------------------

def _validate(schema, raw: bytes):
    """schema: a model class or a TypeAdapter."""
    try:
        if isinstance(schema, TypeAdapter):
            return schema.validate_json(raw)
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise api_error(exc) from None


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "finite_number": "a finite number",
               "bool_type": "a boolean", "string_type": "a string", "list_type": "an array",
               "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object"}


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _param(loc: tuple) -> Optional[str]:
    """("messages", 0, "content") -> "messages[0].content"; union tags ("<...>") and "[key]" drop out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part.startswith("<") or part == "[key]"):
            out += f".{part}" if out else part
    return out or None


def _describe(error: dict) -> tuple[str, str]:
    """(code, message without the field) for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _TYPE_NAMES:
        return "invalid_type", f"must be {_TYPE_NAMES[kind]}, got {_json_type(value)}"
    bounds = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
              "greater_than": (">", "gt"), "less_than": ("<", "lt")}
    if kind in bounds:
        sign, key = bounds[kind]
        return "invalid_value", f"must be {sign} {ctx[key]}, got {value}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "invalid_value", "must not be empty"
    if kind in ("too_long", "string_too_long"):
        actual = ctx.get("actual_length", len(value))
        return "invalid_value", f"at most {ctx['max_length']} items, got {actual}"
    if kind == "string_pattern_mismatch":
        return "invalid_value", f"must be a token id (a decimal integer), got {value!r}"
    if kind == "literal_error":
        return "invalid_value", f"must be {ctx['expected']}, got {value!r}"
    if kind == "missing":
        return "missing_field", "is required"
    if kind == "extra_forbidden":
        return "unknown_field", "unknown field"
    if kind.startswith(("invalid_", "unsupported")):  # our own (_refuse, _one_of)
        return kind, error["msg"]
    return "invalid_value", error["msg"][:1].lower() + error["msg"][1:]


def api_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # typos first
    loc, kind = error["loc"], error["type"]
    if kind == "json_invalid":
        return invalid(None, f"the request body is not valid JSON: {error['ctx']['error']}", "invalid_json")
    if not loc and kind in _TYPE_NAMES:
        return invalid(None, f"the request body must be a JSON object, got {_json_type(error['input'])}",
                       "invalid_body")
    param = (error.get("ctx") or {}).get("param") or _param(loc)
    code, message = _describe(error)
    is_top_level = param is not None and not re.search(r"[.\[]", param)
    if code != "unknown_field" and error.get("input", ...) is None and is_top_level:
        code, message = "missing_field", "is required"  # null in a required field (optional ones take it)
    return invalid(param, message, code)
