"""From a request's new tokens to what its caller sees, and the one place that decides how a request finished.

After `Scheduler.apply` appends tokens, the engine calls `next_output(request)` for
every request with news. It detokenizes the new tokens, holds back text that might
still become a stop string, and decides whether the request is done:

    stop token   an eos id (unless ignore_eos) or one of stop_token_ids -> STOP, stop_reason = the id
    stop string  one of params.stop appears in the text              -> STOP, stop_reason = the string
    grammar      a structured output's JSON is complete (engine.grammar) -> STOP, stop_reason None
    length       max_tokens produced, or the context is full         -> LENGTH
                 (max_tokens 0: as soon as the prompt is computed)

A step may bring several tokens (a verify step of speculative decoding): they are
judged one at a time, in order, as if each had come alone, and the tokens after the
one that ends the request are dropped (`Request.truncate_output`), so the output is
token for token what one token a step gives.

An abort or an error is decided by its cause (the caller, the engine, a failed row)
through `Scheduler.finish`; this module then only builds the final output. A
scoring request has a single output, when it finishes, with its label logprobs.
A request that wants prompt logprobs gets them once, whole, in its first output
after its prompt is computed (the one with its first token, if any).
"""

from __future__ import annotations

from typing import Callable, Optional

from kvloom.engine.request import FinishReason, Request, RequestOutput


def token_finish(request: Request, max_model_len: int,
                 count: Optional[int] = None) -> Optional[tuple[FinishReason, Optional[int]]]:
    """How the request's output token number `count` (1-based; default: the newest) ends it, if it does:
    (reason, stop token id or None)."""
    params = request.params
    count = len(request.output_ids) if count is None else count
    token = request.output_ids[count - 1]
    if not params.ignore_eos and token in request.eos_token_ids:
        return FinishReason.STOP, token
    if token in params.stop_token_ids:
        return FinishReason.STOP, token
    if request.grammar is not None and request.grammar.is_complete:
        return FinishReason.STOP, None
    if count >= params.max_tokens or len(request.prompt_ids) + count >= max_model_len:
        return FinishReason.LENGTH, None
    return None


def next_output(request: Request, *, max_model_len: int, finish: Callable) -> RequestOutput:
    """The request's news since its last output; `finish(request, reason, stop_reason)` ends it when a stop
    token, a stop string or the length says so."""
    if request.score is not None:
        return _output(request, "", (), (), label_logprobs=tuple(request.score.label_logprobs)
                       if request.is_finished and request.score.is_done else None)
    start = request.num_emitted_tokens
    new_ids = request.output_ids[start:]
    matcher = request.stop_matcher
    decision, text = None, ""
    for i, token in enumerate(new_ids):
        if not request.is_finished:
            decision = token_finish(request, max_model_len, start + i + 1)
        piece = request.detokenizer.add(token) if decision is None or decision[1] is None else ""
        if matcher is not None:
            piece, stopped = matcher.feed(piece)
            if stopped and not request.is_finished:
                decision = (FinishReason.STOP, matcher.stopped_by)
        text += piece
        if decision is not None:
            if i + 1 < len(new_ids):  # the tokens after the end were never meant to be
                request.truncate_output(start + i + 1)
                new_ids = new_ids[:i + 1]
            break
    new_logprobs = request.output_logprobs[start:]
    request.num_emitted_tokens = len(request.output_ids)
    prompt_done = request.num_computed_tokens >= len(request.prompt_ids)
    if request.params.max_tokens == 0 and prompt_done and not request.is_finished:
        decision = FinishReason.LENGTH, None
    prompt_logprobs = None
    wants_prompt_logprobs = request.wants_prompt_logprobs and not request.prompt_logprobs_emitted
    if wants_prompt_logprobs and request.has_all_prompt_logprobs:
        prompt_logprobs = (None, *request.prompt_logprobs)
        request.prompt_logprobs_emitted = True
    if request.is_finished or decision is not None:
        tail = request.detokenizer.finish()
        if matcher is not None:
            tail, stopped = matcher.feed(tail)
            if stopped and not request.is_finished:
                decision = (FinishReason.STOP, matcher.stopped_by)
            tail += matcher.flush()
        text += tail
    if decision is not None and not request.is_finished:
        finish(request, *decision)
    return _output(request, text, tuple(new_ids), tuple(new_logprobs), prompt_logprobs=prompt_logprobs)


def _output(request: Request, text: str, token_ids: tuple, logprobs: tuple, label_logprobs=None,
            prompt_logprobs=None) -> RequestOutput:
    done = request.is_finished
    return RequestOutput(
        request_id=request.request_id, text=text, token_ids=token_ids, logprobs=logprobs, finished=done,
        finish_reason=request.finish_reason, stop_reason=request.stop_reason,
        usage=request.usage() if done else None, error=request.error, error_code=request.error_code,
        label_logprobs=label_logprobs, prompt_logprobs=prompt_logprobs,
    )
