"""Multi-item scoring: inputs, packing and label probabilities (the contract is SCORING.md).

    scores[i][j] = P(label_j | query ++ items[i])

Three paths, one contract:
- "single": each item is its own request `query ++ item` whose prefill ends in
  label logprobs (the prefix cache shares the query between them);
- "batched": the query is prefilled once; score steps then extend it with one
  item per row, every row reading the query's pages;
- "packed": the query is prefilled once; each score step packs many items
  into one row with a segment mask (an item sees the query and itself only)
  and positions restarting at len(query) for every item. No delimiter token
  is needed: segment ids keep items apart, so none is reserved or rejected.
The scheduler interleaves score steps with generation steps, so neither kind
of work waits more than one step for the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from kvloom.engine.config import SCORING_MODES as MODES  # noqa: F401 - the modes, named where scoring lives
from kvloom.engine.config import ScoringConfig


@dataclass(frozen=True)
class ScoreInputs:
    query: tuple[int, ...]
    items: tuple[tuple[int, ...], ...]
    label_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.query) + sum(len(i) for i in self.items)


@dataclass(frozen=True)
class ScoreOutput:
    scores: list[list[float]]
    prompt_tokens: int


def _kind(value) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in value):
        return "ids"
    return "invalid"


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{name}[{i}]: token id {t} is outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


def encode_inputs(tokenizer, query, items, label_token_ids, *, vocab_size: int, limits: ScoringConfig,
                  max_model_len: int) -> ScoreInputs:
    """Validate and tokenize; every ValueError starts with the field it is about."""
    q_kind = _kind(query)
    if q_kind == "invalid":
        raise ValueError("query: must be a string or an array of token ids")
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ValueError("items: must be a string, an array of strings or an array of token id arrays")
    kinds = {_kind(item) for item in items}
    if "invalid" in kinds or (items and all(isinstance(t, int) for t in items)):
        raise ValueError("items: must be a string, an array of strings or an array of token id arrays")
    if len(kinds) > 1 or (kinds and kinds != {q_kind}):
        raise ValueError(f"items: text and token ids must not be mixed (query is {q_kind})")
    if len(items) > limits.max_items:
        raise ValueError(f"items: {len(items)} items exceeds the limit of {limits.max_items}")
    if not isinstance(label_token_ids, (list, tuple)) or not label_token_ids:
        raise ValueError("label_token_ids: must be a non-empty array of token ids")
    if len(label_token_ids) > limits.max_label_tokens:
        raise ValueError(f"label_token_ids: {len(label_token_ids)} labels exceeds the limit of "
                         f"{limits.max_label_tokens}")
    for i, t in enumerate(label_token_ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise ValueError(f"label_token_ids[{i}]: must be an integer")
    labels = _check_ids("label_token_ids", label_token_ids, vocab_size)
    if q_kind == "text":
        q_ids = tuple(tokenizer.encode(query)) if query else ()
        item_ids = [tuple(tokenizer.encode(item, add_special_tokens=False)) for item in items]
    else:
        q_ids = _check_ids("query", query, vocab_size)
        item_ids = [_check_ids(f"items[{i}]", item, vocab_size) for i, item in enumerate(items)]
    if not q_ids:
        raise ValueError("query: must not be empty")
    for i, item in enumerate(item_ids):
        if not item:
            raise ValueError(f"items[{i}]: must not be empty")
        if len(item) > limits.max_item_tokens:
            raise ValueError(f"items[{i}]: {len(item)} tokens exceeds the limit of {limits.max_item_tokens}")
    inputs = ScoreInputs(q_ids, tuple(item_ids), labels)
    if inputs.num_tokens > limits.max_total_tokens:
        raise ValueError(f"items: query and items hold {inputs.num_tokens} tokens, over the limit of "
                         f"{limits.max_total_tokens}")
    longest = max((len(i) for i in item_ids), default=0)
    if len(q_ids) + longest > max_model_len:
        raise ValueError(f"query: {len(q_ids)} tokens plus the longest item ({longest}) exceed the context "
                         f"length {max_model_len}")
    return inputs


def label_probabilities(logprobs: Sequence[float], apply_softmax: bool) -> list[float]:
    """apply_softmax: softmax over the label logits (= over their logprobs); else exp(logprob)."""
    if not apply_softmax:
        return [math.exp(v) for v in logprobs]
    top = max(logprobs)
    exps = [math.exp(v - top) for v in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def pack_items(items: Sequence[tuple[int, ...]], start: int, capacity: int, max_items: int) -> list[int]:
    """Indices of the items from `start` that fit, in order, in `capacity` tokens (at most max_items)."""
    chosen, used = [], 0
    for index in range(start, len(items)):
        n = len(items[index])
        if used + n > capacity or len(chosen) >= max_items:
            break
        chosen.append(index)
        used += n
    return chosen

