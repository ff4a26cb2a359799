"""Load: requests sent to a server at a load point, closed loop (C workers, each sending its next
request when the last one answered) or open loop (a Poisson or constant arrival clock at R
requests/s, optionally capped at C in flight).

    run_phase(send, specs, load, ...) -> Phase: every request's RequestRecord, the wall time, and
        whether the --time-limit cut it short (requests in flight then are cancelled and recorded as
        "time_limit" errors). `send(spec, rec)` does one request (tools.http_client.send_request).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from kvloom.tools.slo import RequestRecord
from kvloom.tools.workload import RequestSpec


@dataclass(frozen=True)
class LoadPoint:
    """Closed loop with `concurrency` workers, or open loop at `request_rate` req/s (capped at
    `concurrency` in flight when both are set)."""

    concurrency: Optional[int] = None
    request_rate: Optional[float] = None
    arrival: str = "poisson"  # or "constant"

    @property
    def label(self) -> str:
        if self.request_rate is None:
            return f"c={self.concurrency}"
        return f"rate={self.request_rate:g}" + (f",c={self.concurrency}" if self.concurrency else "")

    def to_json(self) -> dict:
        return {"concurrency": self.concurrency, "request_rate": self.request_rate,
                "arrival": self.arrival if self.request_rate is not None else None}


@dataclass
class Phase:
    records: list[RequestRecord]
    duration_s: float
    is_time_limited: bool


async def run_phase(send: Callable, specs: Iterator[RequestSpec], load: LoadPoint, *,
                    num_requests: Optional[int], duration_s: Optional[float], time_limit_s: float,
                    rng: np.random.Generator, on_done: Callable[[], None] = lambda: None) -> Phase:
    """Send requests under `load` until num_requests were sent or duration_s passed, then wait for
    those in flight; past time_limit_s cancel them (they become "time_limit" errors).
    `send(spec, rec)` does one request."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    stop_sending_at = start + duration_s if duration_s else math.inf

    num_sent = 0  # counted here, not from records: an open loop behind its clock hands out several
    # specs before their tasks start

    def next_spec() -> Optional[RequestSpec]:
        nonlocal num_sent
        if num_requests is not None and num_sent >= num_requests:
            return None
        if time.perf_counter() >= stop_sending_at:
            return None
        num_sent += 1
        return next(specs)

    async def one(spec: RequestSpec) -> None:
        rec = RequestRecord()
        records.append(rec)
        try:
            await send(spec, rec)
        except asyncio.CancelledError:
            rec.error = "time_limit"
            raise
        finally:
            on_done()

    tasks: set[asyncio.Task] = set()

    async def closed_loop() -> None:
        async def worker():
            while (spec := next_spec()) is not None:
                await one(spec)

        tasks.update(asyncio.ensure_future(worker()) for _ in range(load.concurrency))
        await asyncio.gather(*tasks)

    async def open_loop() -> None:
        in_flight = asyncio.Semaphore(load.concurrency) if load.concurrency else None
        send_at = time.perf_counter()
        while True:
            delay = send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight is not None:
                await in_flight.acquire()
            spec = next_spec()
            if spec is None:
                break
            task = asyncio.ensure_future(one(spec))
            tasks.add(task)
            if in_flight is not None:
                task.add_done_callback(lambda _: in_flight.release())
            gap = 1.0 / load.request_rate
            send_at += rng.exponential(gap) if load.arrival == "poisson" else gap
        await asyncio.gather(*tasks)

    is_time_limited = False
    try:
        await asyncio.wait_for(closed_loop() if load.request_rate is None else open_loop(), time_limit_s)
    except asyncio.TimeoutError:
        is_time_limited = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Phase(records, time.perf_counter() - start, is_time_limited)
