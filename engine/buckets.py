"""The compiled step shapes.

A step is D decode rows (one token each) followed by R prefill rows of Q tokens
each. Every shape the runner can see is listed here, so warm-up compiles them
all and steady state never compiles. Decode-only steps take D from powers of
two up to max_running; steps with prefill take D = 0 or D = the largest decode
bucket, and (R, Q) from a short menu with R * Q within the step's token budget.
The attention's page loop has a dynamic trip count, so context length is not a
shape dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvloom.engine.config import ScoringConfig, SchedulerConfig


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


@dataclass(frozen=True)
class StepShape:
    num_decode_rows: int
    num_prefill_rows: int
    prefill_len: int
    is_score: bool = False  # a score step: the prefill rows hold items extending a shared query

    @property
    def num_tokens(self) -> int:
        return self.num_decode_rows + self.num_prefill_rows * self.prefill_len

    @property
    def num_rows(self) -> int:
        return self.num_decode_rows + self.num_prefill_rows


@dataclass(frozen=True)
class BucketPlan:
    decode_rows: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    max_prefill_tokens: int  # R * Q of any prefill shape stays within this
    score_shapes: tuple[tuple[int, int], ...] = ()  # (rows, tokens per row) of score steps, by tokens
    score_logits_rows: int = 0  # items per score step, padded

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, scoring: ScoringConfig = ScoringConfig()) -> "BucketPlan":
        per_step = scoring.tokens_per_step
        if scoring.mode == "packed":  # one row of packed items
            score_shapes = tuple((1, q) for q in _powers(per_step, base=2, start=min(64, per_step)))
        else:  # one item per row
            score_shapes = tuple((min(scoring.max_items_per_step, per_step // q), q)
                                 for q in _powers(per_step, base=4, start=min(32, per_step)))
        return cls(
            decode_rows=_powers(cfg.max_running),
            prefill_rows=_powers(cfg.max_prefill_seqs),
            prefill_lens=_powers(cfg.chunk_size, base=4, start=min(16, cfg.chunk_size)),
            max_prefill_tokens=max(cfg.max_tokens_per_step, cfg.chunk_size),
            score_shapes=score_shapes,
            score_logits_rows=scoring.max_items_per_step,
        )

    def score_shape(self, num_rows: int, row_len: int) -> Optional[StepShape]:
        """The smallest score shape with at least num_rows rows of row_len tokens, or None."""
        for rows, q in self.score_shapes:
            if rows >= num_rows and q >= row_len:
                return StepShape(0, rows, q, is_score=True)
        return None

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

    def all_shapes(self) -> list[StepShape]:
        shapes = [StepShape(d, 0, 0) for d in self.decode_rows]
        for r in self.prefill_rows:
            for q in self.prefill_lens:
                if r * q <= self.max_prefill_tokens:
                    shapes += [StepShape(0, r, q), StepShape(self.decode_rows[-1], r, q)]
        return shapes + [StepShape(0, r, q, is_score=True) for r, q in self.score_shapes]

    def logits_rows(self, shape: StepShape) -> int:
        """Logits rows of a step: one per item of a score step; else one per row, padded to a power of two."""
        if shape.is_score:
            return self.score_logits_rows
        return 1 << max(0, (shape.num_rows - 1).bit_length())
