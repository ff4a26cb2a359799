"""The response bodies of the HTTP surface, defined once as pydantic models.

`/openapi.json` renders its 200 and error responses from these models (`api/openapi.py`), and
`tests/api/test_responses.py` validates what the server really sends against them, with unknown fields
forbidden, so the document, the tests and the server cannot drift apart. The server itself builds
plain dicts on its hot path (orjson), shaped as these models say.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Optional[Literal["stop", "length"]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CachedTokens(_Body):
    cached_tokens: int = Field(description="Prompt tokens served by the prefix cache.")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[CachedTokens] = None


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Body):
    content: list[ChatTokenLogprob]


class ChatMessage(_Body):
    role: Literal["assistant"]
    content: Optional[str]


class ChatChoice(_Body):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Body):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(_Body):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletionChunk(_Body):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[Optional[float]] = Field(description="null for the first token of an echoed prompt")
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason


class Completion(_Body):
    """A text completion, or one `data:` event of a streamed one (then usage is null or absent but in the
    last event with stream_options.include_usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ScoreUsage(_Body):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(_Body):
    object: Literal["scoring"]
    model: str
    scores: list[list[float]] = Field(description="Per item, the probability of each label token, in order.")
    usage: ScoreUsage


class TokenizeResponse(_Body):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]]


class DetokenizeResponse(_Body):
    prompt: str


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: Optional[int]


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(_Body):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(_Body):
    """Every error, in the OpenAI envelope (in a stream: one `data:` event, then `data: [DONE]`)."""

    error: ErrorDetail
