"""The compute thread: every JAX call of an engine runs on its one dedicated thread.

The event loop submits a callable and awaits its result without blocking;
results and exceptions come back through the loop's thread-safe call. The
thread is a daemon, so a step that never returns cannot hold the process.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Optional


class ComputeThreadDead(RuntimeError):
    """The compute thread is gone; nothing submitted to it will run."""


class KillComputeThread(BaseException):
    """Raised inside a job, ends the compute thread (fault injection: a thread that dies)."""


def _resolve(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # cancelled by the awaiting side
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _expire(future: asyncio.Future, timeout: float) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError(f"the job ran past {timeout:g}s"))


class ComputeThread:
    def __init__(self, name: str = "kvloom-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    async def run(self, fn: Callable, *args, timeout: Optional[float] = None):
        """Run fn(*args) on the compute thread; await its result (or exception)."""
        if self._closed or not self._thread.is_alive():
            raise ComputeThreadDead("the compute thread is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, args, future, loop))
        if timeout is None:
            return await future
        # A timer, not asyncio.wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives
        # as the job completes, which would leave the cancelled engine loop waiting forever.
        timer = loop.call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, future, loop = job
            if fn is None:
                loop.call_soon_threadsafe(_resolve, future, True, None)
                return
            dying = False
            try:
                value, ok = fn(*args), True
            except KillComputeThread as exc:
                value, ok, dying = ComputeThreadDead(f"the compute thread died: {exc}"), False, True
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the awaiting side
                value, ok = exc, False
            try:
                loop.call_soon_threadsafe(_resolve, future, ok, value)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            del job, fn, args, future, value
            if dying:
                return

    def close(self) -> None:
        """Ask the thread to exit after the job in hand; does not wait."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    async def aclose(self, timeout: float) -> bool:
        """Ask the thread to exit and wait up to `timeout` s without blocking the loop; True if it has
        exited."""
        if self._closed or not self._thread.is_alive():
            self.close()
            return not self._thread.is_alive()
        self._closed = True
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        self._jobs.put((None, (), exited, loop))  # the exit marker: resolved, then the thread returns
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except asyncio.TimeoutError:
            return False
        self._thread.join(1.0)
        return not self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
