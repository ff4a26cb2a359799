"""The step contract between the event loop and the compute thread: one module, imported by both sides.

    scheduler.schedule()  -> ScheduledBatch      (event loop: an immutable snapshot of plain data)
    runner.step(batch)    -> StepResult          (compute thread: numpy arrays, nothing else)
    scheduler.apply(batch, result)               (event loop: the only place requests change)

One step ahead (a runner with `launch`/`collect`, `EngineConfig.overlap_schedule`): while step N
runs, the event loop builds step N+1 with `scheduler.schedule_ahead(N)`. Its decode rows carry
`pending_row`: their input token is the one step N samples for that row of N (`PENDING_TOKEN` stands
in their `token_ids`), which the runner reads on the device from N's output; then N's result is
collected and applied, then N+1's:

    runner.launch(batch N+1, prev=handle N) -> handle N+1   (dispatched, not waited for)
    runner.collect(handle N)                -> StepResult N

A batch is either a generation step (decode rows, then prefill rows: `ScheduledRow`)
or a score step (`ScoreRow`s of one scoring mode). With speculative decoding a
generation step may be a verify step (`shape.verify_len`): decode rows only, each
row's token followed by its `draft_token_ids`, and the result holds the greedy
token after every one of them (`StepResult.verify_token_ids`). Every row carries its request's
`version`, so a result for a request that was preempted, aborted or advanced since
the batch was built is recognised as stale and dropped.

`Runner` names every attribute and method the engine uses. The real runner
(`engine.runner.ModelRunner`), the fault-injecting wrapper (`engine.faults`) and
the test fake implement it; `check_runner` refuses one that does not, when the
engine builds it, not in the middle of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from kvloom.engine.buckets import StepShape
from kvloom.engine.request import SamplingParams


@dataclass(frozen=True)
class ScheduledRow:
    """One request's share of a generation step, copied out of the request."""

    request_id: str
    version: int
    token_ids: tuple[int, ...]
    start_pos: int
    page_ids: tuple[int, ...]  # covers start_pos + len(token_ids) tokens
    sample: bool  # the chunk ends at the request's last token: sample the next one
    params: SamplingParams
    seed: int
    num_output_tokens: int  # the sampling counter: the same seed and count give the same draw
    penalty_prompt_ids: tuple[int, ...] = ()  # filled only when params.has_penalties
    penalty_output_ids: tuple[int, ...] = ()
    label_ids: tuple[int, ...] = ()  # a scoring prefill ending here: its last logits give label logprobs
    # Prompt logprobs wanted: prompt_targets[i] is the prompt token after token_ids[i] (a prefix of the row:
    # the prompt's last token has none); its logprob and params.prompt_logprobs alternatives come back.
    prompt_targets: tuple[int, ...] = ()
    # A structured output's allowed next tokens (engine.grammar), set only when the row samples:
    # int32 [ceil(vocab_size / 32)], bit j of word w allows token 32 * w + j; None allows every token.
    token_bitmask: Optional[np.ndarray] = field(default=None, compare=False)
    # A verify step's decode row (engine.speculative): proposed next tokens, computed after token_ids (their
    # KV is written at the positions after it; page_ids cover them) and checked against the greedy tokens.
    draft_token_ids: tuple[int, ...] = ()
    # A row of a step built one ahead (scheduler.schedule_ahead): token_ids is (PENDING_TOKEN,), and the
    # token is the one sampled for row `pending_row` (an index of `rows`) of the step before. -1: none.
    pending_row: int = -1


PENDING_TOKEN = -1  # a token id not known when the batch was built (ScheduledRow.pending_row)


@dataclass(frozen=True)
class ScoreRow:
    """Items of one scoring request extending its computed query (positions restart at past_len).
    Batched mode: one item per row; packed mode: several items per row, kept apart by segment ids."""

    request_id: str
    version: int
    page_ids: tuple[int, ...]
    past_len: int
    items: tuple[tuple[int, tuple[int, ...]], ...]  # (item index, token ids)
    label_ids: tuple[int, ...]


@dataclass(frozen=True)
class ScheduledBatch:
    step_id: int
    shape: StepShape
    decode_rows: tuple[ScheduledRow, ...] = ()
    prefill_rows: tuple[ScheduledRow, ...] = ()
    score_rows: tuple[ScoreRow, ...] = ()
    score_mode: str = ""  # a score step: "batched" or "packed", the mode of every task in it

    @property
    def rows(self) -> tuple[ScheduledRow, ...]:
        return self.decode_rows + self.prefill_rows

    @property
    def request_ids(self) -> list[str]:
        return [row.request_id for row in self.rows] + [row.request_id for row in self.score_rows]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.prefill_rows)

    @property
    def num_tokens(self) -> int:
        items = sum(len(t) for r in self.score_rows for _, t in r.items)
        return sum(len(r.token_ids) + len(r.draft_token_ids) for r in self.rows) + items


@dataclass(frozen=True)
class StepResult:
    """Per row of the batch (decode rows first): the sampled token and its logprobs."""

    step_id: int
    token_ids: np.ndarray  # [num_rows] int
    logprobs: Optional[np.ndarray] = None  # [num_rows] float
    top_ids: Optional[np.ndarray] = None  # [num_rows, k] int
    top_logprobs: Optional[np.ndarray] = None  # [num_rows, k] float
    # Label logprobs: per row with label_ids (generation steps), or per item in order (score steps).
    label_logprobs: Optional[np.ndarray] = None  # [n, max labels]
    row_finite: Optional[np.ndarray] = None  # [num_rows] bool: False fails that row's request alone
    # Prompt logprobs: one entry per prompt target, rows in batch order (decode rows first), each row's in
    # order.
    prompt_logprobs: Optional[np.ndarray] = None  # [num targets] float: the target's logprob
    prompt_top_ids: Optional[np.ndarray] = None  # [num targets, k] int
    prompt_top_logprobs: Optional[np.ndarray] = None  # [num targets, k] float
    # A verify step: per row, the token sampled after its token and after each of its drafts ([:, 0] is
    # token_ids); columns past the row's drafts are padding.
    verify_token_ids: Optional[np.ndarray] = None  # [num_rows, verify_len] int


class RowError(Exception):
    """A step could not take some rows; the engine fails those requests alone and carries on."""

    def __init__(self, request_ids: list[str], message: str):
        super().__init__(message)
        self.request_ids = request_ids


class Runner(Protocol):
    """What the engine needs of a runner. Built and called on the compute thread only."""

    source: object  # the model source (`engine.models.loader.ModelSource`): name and path
    model_config: object  # `engine.config.ModelConfig`
    vocab_size: int
    page_size: int
    max_model_len: int
    num_pages: int  # KV pages, page 0 included (the padding sink)

    @property
    def num_compiled(self) -> int:
        """Compiled executables so far (warm-up compiles every shape; steady state adds none)."""

    def warmup(self) -> int:
        """Compile every step shape of the bucket plan; returns the number of compiled executables."""

    def step(self, batch: ScheduledBatch) -> StepResult:
        """Run one batch. Raises RowError to refuse some rows; any other exception fails the engine."""

    def fresh(self) -> "Runner":
        """A new runner sharing this one's weights, with a new KV cache (restart in place)."""

    # Optional: a runner that can run one step ahead has both of these (`runs_ahead`).
    # def launch(self, batch: ScheduledBatch, prev: Optional[handle]) -> handle:
    #     dispatch the batch without waiting for it; `prev` is the launched step before it, whose sampled
    #     tokens feed this batch's pending rows. RowError as `step`; `step(b)` is collect(launch(b, None)).
    # def collect(self, handle) -> StepResult:  wait for a launched step's result.


RUNNER_MEMBERS = ("source", "model_config", "vocab_size", "page_size", "max_model_len", "num_pages",
                  "num_compiled", "warmup", "step", "fresh")


def runs_ahead(runner) -> bool:
    """Whether `runner` has the optional launch/collect pair (one step ahead)."""
    return callable(getattr(runner, "launch", None)) and callable(getattr(runner, "collect", None))


def check_runner(runner) -> None:
    """Refuse a runner that does not implement the `Runner` protocol, naming what it lacks."""
    missing = [name for name in RUNNER_MEMBERS if not hasattr(runner, name)]
    not_callable = [name for name in ("warmup", "step", "fresh") if name not in missing
                    and not callable(getattr(runner, name))]
    if missing or not_callable:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                   ([f"not callable: {', '.join(not_callable)}"] if not_callable else [])
        raise TypeError(f"runner: {type(runner).__name__} does not implement the Runner protocol "
                        f"({'; '.join(problems)})")
