"""One engine's structured-output compiler (engine.grammar): built at the first request with a
response_format (seconds for a large vocabulary) on a thread of its own, off the event loop, then kept;
or, when this tokenizer cannot have one, the reason, which every later such request is refused with.
Requests without response_format never need it."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from kvloom.engine.executor import ComputeThread
from kvloom.engine.grammar import GrammarCompiler

log = logging.getLogger(__name__)


class StructuredOutput:
    def __init__(self, thread_name: str):
        self.compiler: Optional[GrammarCompiler] = None
        self.unavailable: Optional[str] = None  # why this tokenizer cannot have a compiler
        self._building: Optional[asyncio.Future] = None
        self._thread_name = thread_name

    def check_available(self) -> None:
        """ValueError naming response_format once the compiler is known to be unavailable."""
        if self.unavailable is not None:
            raise ValueError(f"response_format: structured output is unavailable with this model's "
                             f"tokenizer ({self.unavailable})")

    async def get(self, tokenizer, vocab_size: int) -> GrammarCompiler:
        """The compiler, built at the first call (concurrent callers share the build)."""
        if self.compiler is None and self.unavailable is None:
            if self._building is None:
                self._building = asyncio.ensure_future(self._build(tokenizer, vocab_size))
            await asyncio.shield(self._building)
        self.check_available()
        return self.compiler

    def cancel(self) -> None:
        """Stop waiting for a build in progress (its thread ends with the job in hand)."""
        if self._building is not None:
            self._building.cancel()

    async def _build(self, tokenizer, vocab_size: int) -> None:
        thread = ComputeThread(name=self._thread_name)
        try:
            self.compiler = await thread.run(self._compile, tokenizer, vocab_size)
        finally:
            thread.close()
            self._building = None

    def _compile(self, tokenizer, vocab_size: int) -> Optional[GrammarCompiler]:
        try:
            return GrammarCompiler(tokenizer.hf_tokenizer, vocab_size, tokenizer.eos_token_ids)
        except Exception as exc:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
            log.warning("structured output is unavailable: %s", exc)
            self.unavailable = f"{type(exc).__name__}: {exc}"
            return None
