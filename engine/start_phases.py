"""Where a start's time goes: the engine's start phases, in order, each with its wall-clock seconds.

`Engine.start()` (and `restart()`) measures each phase as it awaits it (loading the model, the
tokenizer, warm-up, the round trip of one request); at READY the total is taken, the engine logs one
line and `/status` shows `start` (`as_dict`), with the runner's own breakdown as its detail. The
phases partition the start: each runs from the end of the one before (the moments between two
phases count in the second), so they add up to the total. Work overlapped with a phase (the tokenizer
loads while the model does) is in the detail.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional


class StartPhases:
    def __init__(self) -> None:
        self._started = self._last = time.monotonic()
        self.phases: dict[str, float] = {}
        self.detail: dict = {}  # what the phases hide: work overlapped with another phase, counts
        self.total_s: Optional[float] = None  # set at READY

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """The phase `name`: from the end of the previous one to the end of this block."""
        try:
            yield
        finally:
            now = time.monotonic()
            self.phases[name] = self.phases.get(name, 0.0) + now - self._last
            self._last = now

    def finish(self) -> None:
        """The start is over at the end of its last phase."""
        self.total_s = self._last - self._started

    def summary(self) -> str:
        """'load_model 1.2s, tokenizer 0.4s, ...'"""
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases.items())

    def as_dict(self, runner_detail: Optional[dict] = None) -> dict:
        """total_s (None until READY), phases, and the detail with the runner's own (loading, warm-up)."""
        detail = dict(self.detail, **(runner_detail or {}))
        return {"total_s": None if self.total_s is None else round(self.total_s, 3),
                "phases": {name: round(seconds, 3) for name, seconds in self.phases.items()},
                "detail": {k: round(v, 3) if isinstance(v, float) else v for k, v in detail.items()}}
