"""A change signal that any number of coroutines can wait on with a condition and a timeout."""

from __future__ import annotations

import asyncio
from typing import Callable


class Notifier:
    def __init__(self):
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every waiter (each re-checks its own condition)."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Return once predicate() holds; raises asyncio.TimeoutError after `timeout` s."""
        async def wait():
            while not predicate():
                await self._event.wait()

        await asyncio.wait_for(wait(), timeout)
