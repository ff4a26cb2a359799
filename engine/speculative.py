"""Speculative decoding by prompt lookup: drafts from the request's own tokens, verified in one step.

Pure Python and numpy (no JAX), used by the scheduler on the event loop:

    schedule():  may_draft(request) and propose_ngram(request.all_ids, ...) -> ScheduledRow.draft_token_ids
    runner:      a verify row is the row's next input token and its drafts, with the greedy token after
                 each of them (StepResult.verify_token_ids)
    apply():     num_accepted(drafts, greedy) -> the request takes greedy[:accepted + 1]; SpecDecodeStats

Greedy verification makes the output the one plain decoding gives: draft i is kept only if it is the
model's greedy token after the tokens before it, and the step always adds the model's own token after
the kept drafts, so a step yields 1 to k + 1 tokens. Only plain greedy requests draft (`may_draft`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: Sequence[int], num_tokens: int, max_n: int, min_n: int) -> tuple[int, ...]:
    """Up to `num_tokens` drafts for the sequence `tokens`: for n from max_n down to min_n, the latest
    earlier occurrence of its last n tokens, and the tokens that followed that occurrence. Where the
    copy runs into the sequence's end it goes on copying itself (a loop of period p proposes its next
    tokens, not just the p that exist). () when no n-gram recurs."""
    length = len(tokens)
    if num_tokens <= 0 or length < 2:
        return ()
    seq = np.asarray(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows starting at 0 .. length - 1 - n: each is followed by at least one token
        windows = sliding_window_view(seq[:length - 1], n)
        hits = np.flatnonzero((windows == seq[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the first token after the latest occurrence
            extended = list(tokens[start:start + num_tokens])
            while len(extended) < num_tokens:  # tokens[start + i] for i past the end: the drafts' own
                extended.append(extended[len(extended) - (length - start)])
            return tuple(int(t) for t in extended)
    return ()


def num_accepted(drafts: Sequence[int], greedy: Sequence[int]) -> int:
    """How many leading drafts the model confirms: greedy[i] is its token after the row's input token and
    drafts[:i], so draft i stands when it equals greedy[i] and every draft before it stood."""
    accepted = 0
    for draft, token in zip(drafts, greedy):
        if int(draft) != int(token):
            break
        accepted += 1
    return accepted


def may_draft(request) -> bool:
    """Plain greedy requests only: temperature 0, no penalties, logit bias, structured output, logprobs or
    prompt logprobs, and min_tokens no longer banning (each of those changes or reports the distribution
    at every position; such requests decode one token a step)."""
    p = request.params
    return (p.temperature == 0 and not p.has_penalties and not p.logit_bias and request.grammar is None
            and p.logprobs is None and p.prompt_logprobs is None
            and len(request.output_ids) >= p.min_tokens)


@dataclass
class SpecDecodeStats:
    """Cumulative counts of an engine's verify rows (kept across restarts, so the counters only grow)."""

    num_drafts: int = 0  # verify rows: a request's drafts checked by one step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list = field(default_factory=list)  # [i]: drafts accepted at position i

    def record(self, num_drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position += [0] * (num_drafted - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def since(self, earlier: "SpecDecodeStats") -> "SpecDecodeStats":
        """The counts added after `earlier` (a copy taken before)."""
        per_position = list(self.accepted_per_position)
        for i, count in enumerate(earlier.accepted_per_position):
            per_position[i] -= count
        return SpecDecodeStats(self.num_drafts - earlier.num_drafts,
                               self.num_draft_tokens - earlier.num_draft_tokens,
                               self.num_accepted_tokens - earlier.num_accepted_tokens, per_position)

    def as_dict(self) -> dict:
        """The counts, the acceptance rate, and the tokens each verify row yielded on average (1 + the
        drafts it kept)."""
        drafts = self.num_drafts
        return dict(num_drafts=drafts, num_draft_tokens=self.num_draft_tokens,
                    num_accepted_tokens=self.num_accepted_tokens,
                    acceptance_rate=self.num_accepted_tokens / self.num_draft_tokens
                    if self.num_draft_tokens else 0.0,
                    mean_tokens_per_verify_step=1 + self.num_accepted_tokens / drafts if drafts else 0.0,
                    accepted_per_position=list(self.accepted_per_position))
