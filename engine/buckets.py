"""The compiled step shapes.

A step is D decode rows (one token each) followed by R prefill rows of Q tokens
each. Every shape the runner can see is listed here, so warm-up compiles them
all and steady state never compiles. Decode-only steps take D from powers of
two up to max_running; steps with prefill take D = 0 or D = the largest decode
bucket, and (R, Q) from powers of two (Q from 16 tokens up to the chunk size, R
up to max_prefill_seqs) with R * Q within the step's token budget. Powers of two
keep a burst of short prompts cheap: 32 chat prompts of 20-32 tokens are two
steps of 16 x 32 tokens, where a menu of 64-token rows, 4 per step, took eight
steps padded to twice their length (tools.profile_step and kvloom compare's
decode@32 measure it).
The attention's page loop has a dynamic trip count, so context length is not a
shape dimension.

With speculative decoding on (`SpeculativeConfig`), verify steps add one shape per
decode bucket: D rows of V = k + 1 tokens each (the next input token and up to
k drafts), with logits at every token. A verify step has no prefill rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvloom.engine.config import ScoringConfig, SchedulerConfig, SpeculativeConfig


def _powers(limit: int, base: int = 2, start: int = 1) -> tuple[int, ...]:
    out, v = [], start
    while v < limit:
        out.append(v)
        v *= base
    out.append(limit)
    return tuple(sorted(set(out)))


def round_up(value: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def _score_shapes(mode: str, scoring: ScoringConfig) -> tuple[tuple[int, int], ...]:
    """packed: one row of many items, lengths in powers of two from 64 tokens; batched: one item per row,
    rows x lengths in powers of four from 32 tokens, as many rows as the step's token budget holds."""
    per_step = scoring.tokens_per_step
    if mode == "packed":
        return tuple((1, q) for q in _powers(per_step, base=2, start=min(64, per_step)))
    return tuple((min(scoring.max_items_per_step, per_step // q), q)
                 for q in _powers(per_step, base=4, start=min(32, per_step)))


@dataclass(frozen=True)
class StepShape:
    num_decode_rows: int
    num_prefill_rows: int
    prefill_len: int
    is_score: bool = False  # a score step: the prefill rows hold items extending a shared query
    verify_len: int = 0  # a verify step: each decode row holds this many tokens, logits at every one

    @property
    def num_tokens(self) -> int:
        return self.num_decode_rows * max(1, self.verify_len) + self.num_prefill_rows * self.prefill_len

    @property
    def num_rows(self) -> int:
        return self.num_decode_rows + self.num_prefill_rows


@dataclass(frozen=True)
class BucketPlan:
    decode_rows: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    max_prefill_tokens: int  # R * Q of any prefill shape stays within this
    # (mode, ((rows, tokens per row), ...)) for each enabled multi-item scoring mode, shapes by tokens
    score_shapes: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    score_logits_rows: int = 0  # items per score step, padded
    verify_len: int = 0  # tokens of a verify row (speculative decoding), 0: no verify shapes

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, scoring: ScoringConfig = ScoringConfig(),
                    speculative: SpeculativeConfig = SpeculativeConfig()) -> "BucketPlan":
        return cls(
            decode_rows=_powers(cfg.max_running),
            prefill_rows=_powers(cfg.max_prefill_seqs),
            prefill_lens=_powers(cfg.chunk_size, base=2, start=min(16, cfg.chunk_size)),
            max_prefill_tokens=max(cfg.max_tokens_per_step, cfg.chunk_size),
            score_shapes=tuple((mode, _score_shapes(mode, scoring)) for mode in scoring.multi_item_modes),
            score_logits_rows=scoring.max_items_per_step,
            verify_len=speculative.verify_len,
        )

    @property
    def score_modes(self) -> tuple[str, ...]:
        """The multi-item scoring modes with compiled shapes ("single" needs none of its own)."""
        return tuple(mode for mode, _ in self.score_shapes)

    def score_shape(self, mode: str, num_rows: int, row_len: int) -> Optional[StepShape]:
        """The smallest score shape of `mode` with at least num_rows rows of row_len tokens, or None."""
        for rows, q in dict(self.score_shapes)[mode]:
            if rows >= num_rows and q >= row_len:
                return StepShape(0, rows, q, is_score=True)
        return None

    def max_score_row_len(self, mode: str) -> int:
        return dict(self.score_shapes)[mode][-1][1]

    def prefill_shape(self, num_rows: int, max_len: int) -> Optional[tuple[int, int]]:
        """The smallest (R, Q) bucket holding num_rows rows of up to max_len tokens, or None."""
        if num_rows > self.prefill_rows[-1] or max_len > self.prefill_lens[-1]:
            return None
        rows, length = round_up(num_rows, self.prefill_rows), round_up(max_len, self.prefill_lens)
        return (rows, length) if rows * length <= self.max_prefill_tokens else None

    def step_shape(self, num_decode: int, prefill_lens: list[int]) -> StepShape:
        if not prefill_lens:
            return StepShape(round_up(num_decode, self.decode_rows), 0, 0)
        shape = self.prefill_shape(len(prefill_lens), max(prefill_lens))
        if shape is None:
            raise ValueError(f"no bucket for prefill rows {prefill_lens}")
        return StepShape(self.decode_rows[-1] if num_decode else 0, *shape)

    def verify_shape(self, num_rows: int) -> StepShape:
        """The verify step of num_rows decode rows (speculative decoding on)."""
        return StepShape(round_up(num_rows, self.decode_rows), 0, 0, verify_len=self.verify_len)

    def all_shapes(self) -> list[StepShape]:
        shapes = [StepShape(d, 0, 0) for d in self.decode_rows]
        for r in self.prefill_rows:
            for q in self.prefill_lens:
                if r * q <= self.max_prefill_tokens:
                    shapes += [StepShape(0, r, q), StepShape(self.decode_rows[-1], r, q)]
        score = sorted({(r, q) for _, mode_shapes in self.score_shapes for r, q in mode_shapes})
        verify = [self.verify_shape(d) for d in self.decode_rows] if self.verify_len else []
        return shapes + [StepShape(0, r, q, is_score=True) for r, q in score] + verify

    def logits_rows(self, shape: StepShape) -> int:
        """Logits rows of a step: one per item of a score step, one per token of a verify step; else one per
        row, padded to a power of two."""
        if shape.is_score:
            return self.score_logits_rows
        if shape.verify_len:
            return shape.num_tokens
        return 1 << max(0, (shape.num_rows - 1).bit_length())
