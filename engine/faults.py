"""Fault injection for tests and the fault tool: off unless an engine is built with a `FaultInjector`.

An engine given an injector wraps its runner in `FaultyRunner`; an engine
without one runs the runner as is, so the injection costs nothing when off.
Faults are armed from the event loop and fire on the compute thread:

    raise       a step raises (the engine fails: every request gets an explicit error)
    kill        the compute thread dies
    hang        a step blocks until released (the watchdog fails the engine)
    fail_warmup warm-up raises (the engine stays DEGRADED)
    fail_request a step refuses one request's row (that request alone fails)
    nan_request  one request's row comes back non-finite (that request alone fails)
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from kvloom.engine.batch import RowError, ScheduledBatch, StepResult, runs_ahead
from kvloom.engine.executor import KillComputeThread

KINDS = ("raise", "kill", "hang", "fail_warmup", "fail_request", "nan_request")


class InjectedFault(RuntimeError):
    """A fault raised on purpose by a FaultInjector."""


@dataclass
class _Armed:
    kind: str
    after_steps: int  # fire on the step after this many more steps
    request_id: Optional[str] = None


class FaultInjector:
    def __init__(self):
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self._release = threading.Event()
        self.num_fired = 0

    def arm(self, kind: str, after_steps: int = 0, request_id: Optional[str] = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind in ("fail_request", "nan_request") and not request_id:
            raise ValueError(f"request_id: required for {kind}")
        with self._lock:
            self._armed.append(_Armed(kind, after_steps, request_id))
            self._release.clear()

    def clear(self) -> None:
        """Disarm everything and release a hung step."""
        with self._lock:
            self._armed.clear()
        self._release.set()

    def release(self) -> None:
        self._release.set()

    def _take(self, kinds, request_ids=()) -> Optional[_Armed]:
        with self._lock:
            for fault in self._armed:
                if fault.kind in kinds and (fault.request_id is None or fault.request_id in request_ids):
                    if fault.after_steps > 0:
                        fault.after_steps -= 1
                        continue
                    self._armed.remove(fault)
                    self.num_fired += 1
                    return fault
        return None

    # ---- called on the compute thread ---------------------------------------------------------

    def before_warmup(self) -> None:
        if self._take(("fail_warmup",)):
            raise InjectedFault("injected warm-up failure")

    def before_step(self, request_ids: list[str]) -> None:
        fault = self._take(("raise", "kill", "hang"))
        if fault is None:
            fault = self._take(("fail_request",), request_ids)
        if fault is None:
            return
        if fault.kind == "raise":
            raise InjectedFault("injected step failure")
        if fault.kind == "kill":
            raise KillComputeThread("injected compute thread death")
        if fault.kind == "hang":
            self._release.wait()
            return
        raise RowError([fault.request_id], "injected failure of this request's row")

    def after_step(self, request_ids: list[str], result) -> None:
        fault = self._take(("nan_request",), request_ids)
        if fault is not None and result.row_finite is not None:
            result.row_finite[request_ids.index(fault.request_id)] = False


class FaultyRunner:
    """A `Runner` (engine.batch) wrapping another: the same attributes, with faults around warm-up and
    steps."""

    def __init__(self, runner, injector: FaultInjector):
        self._runner, self._faults = runner, injector
        inner = runner
        self.source, self.model_config, self.vocab_size = inner.source, inner.model_config, inner.vocab_size
        self.page_size, self.max_model_len = inner.page_size, inner.max_model_len
        self.num_pages = inner.num_pages
        self.platform = getattr(inner, "platform", "cpu")
        if runs_ahead(inner):  # one step ahead too: the faults fire at launch, results are checked at collect
            self.launch, self.collect = self._launch, self._collect

    @property
    def wrapped(self):
        return self._runner

    @property
    def num_compiled(self) -> int:
        return self._runner.num_compiled

    @property
    def start_detail(self) -> dict:
        return getattr(self._runner, "start_detail", {})

    def fresh(self) -> "FaultyRunner":
        return FaultyRunner(self._runner.fresh(), self._faults)

    def warmup(self) -> int:
        self._faults.before_warmup()
        return self._runner.warmup()

    def step(self, batch: ScheduledBatch) -> StepResult:
        self._faults.before_step(batch.request_ids)
        return self._after(batch, self._runner.step(batch))

    def _launch(self, batch: ScheduledBatch, prev=None):
        self._faults.before_step(batch.request_ids)
        return batch, self._runner.launch(batch, None if prev is None else prev[1])

    def _collect(self, launched) -> StepResult:
        batch, handle = launched
        return self._after(batch, self._runner.collect(handle))

    def _after(self, batch: ScheduledBatch, result: StepResult) -> StepResult:
        if result.row_finite is None and batch.rows:
            result = dataclasses.replace(result, row_finite=np.ones(len(batch.rows), bool))
        self._faults.after_step(batch.request_ids, result)
        return result
