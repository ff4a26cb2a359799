"""Which replicas may receive traffic: readiness-gated, with thresholds and a circuit breaker.

Data flow: one poll task per replica (owned by `Membership`, on the router's loop) asks
GET /ready every `interval_s` and, while the replica is ready, scrapes GET /metrics for its
prefill rate and inter-token latency. The proxy reports request outcomes back
(`record_failure` / `record_success`) and keeps the load counters on `Replica` current.

States: PENDING (never ready yet) -> READY after `rise` consecutive 200s from /ready. A
definitive "not ready" answer (503) moves a READY replica to NOT_READY at once; `fall`
consecutive failures (connection errors, timeouts, failed requests: the circuit breaker) move
it to DOWN. NOT_READY and DOWN come back after `rise` consecutive 200s. DRAINING is set by an
operator and only cleared by removing the replica. Only READY replicas get new requests.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvloom.api.router_notify import Notifier
from kvloom.engine import metrics

log = logging.getLogger(__name__)


class ReplicaState(str, enum.Enum):
    PENDING = "pending"
    READY = "ready"
    NOT_READY = "not_ready"
    DOWN = "down"
    DRAINING = "draining"


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 1.0  # between /ready polls
    timeout_s: float = 5.0  # per poll
    fall: int = 3  # consecutive failures to mark a replica down
    rise: int = 2  # consecutive successes to bring it (back) in
    ewma: float = 0.3  # weight of a new rate measurement
    measure_rates: bool = True  # scrape /metrics for prefill rate and inter-token latency


class Replica:
    """One upstream server: its state and the load the router has put on it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.state = ReplicaState.PENDING
        self.detail = "not polled yet"
        self.num_successes = 0  # consecutive
        self.num_failures = 0  # consecutive
        self.num_in_flight = 0  # requests sent, not finished
        self.num_queued_tokens = 0  # uncached prompt tokens sent whose first byte has not come back
        self.num_decoding = 0  # requests past their first byte
        self.prefill_tokens_per_s: Optional[float] = None  # measured from the replica's /metrics
        self.inter_token_s: Optional[float] = None
        self._last_counters: Optional[dict] = None

    @property
    def is_routable(self) -> bool:
        return self.state is ReplicaState.READY

    def describe(self) -> dict:
        return {"url": self.url, "state": self.state.value, "detail": self.detail,
                "num_in_flight": self.num_in_flight, "num_queued_tokens": self.num_queued_tokens,
                "num_decoding": self.num_decoding, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "inter_token_s": self.inter_token_s}


_PREFILL_TOKENS, _PREFILL_S = f"{metrics.PREFILL_TOKENS}_total", f"{metrics.PREFILL_SECONDS}_total"
_ITL_SUM, _ITL_COUNT = f"{metrics.INTER_TOKEN_LATENCY}_sum", f"{metrics.INTER_TOKEN_LATENCY}_count"


def _counters(metrics_text: str) -> dict:
    wanted = {_PREFILL_TOKENS, _PREFILL_S, _ITL_SUM, _ITL_COUNT}
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = sample.value
    return out


class Membership:
    def __init__(self, session: aiohttp.ClientSession, config: HealthConfig, notifier: Notifier,
                 on_state_change: Callable[[Replica], None] = lambda r: None):
        self.session, self.config, self.notifier = session, config, notifier
        self.replicas: dict[str, Replica] = {}  # registration order
        self._tasks: dict[str, asyncio.Task] = {}
        self._on_state_change = on_state_change

    def add(self, url: str) -> Replica:
        url = url.rstrip("/")
        if url in self.replicas:
            return self.replicas[url]
        replica = self.replicas[url] = Replica(url)
        self._tasks[url] = asyncio.get_running_loop().create_task(self._poll(replica),
                                                                  name=f"router-poll {url}")
        self.notifier.notify()
        return replica

    async def remove(self, url: str) -> bool:
        url = url.rstrip("/")
        replica = self.replicas.pop(url, None)
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.notifier.notify()
        return replica is not None

    def drain(self, url: str) -> bool:
        replica = self.replicas.get(url.rstrip("/"))
        if replica is not None:
            self._set(replica, ReplicaState.DRAINING, "draining (operator)")
        return replica is not None

    def routable(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.is_routable]

    async def close(self) -> None:
        for url in list(self._tasks):
            await self.remove(url)

    # ---- outcomes ------------------------------------------------------------------------------

    def record_failure(self, replica: Replica, detail: str) -> None:
        replica.num_successes = 0
        replica.num_failures += 1
        if replica.num_failures >= self.config.fall and replica.state not in (ReplicaState.DOWN,
                                                                              ReplicaState.DRAINING):
            self._set(replica, ReplicaState.DOWN, detail)

    def record_success(self, replica: Replica) -> None:
        replica.num_failures = 0

    def _set(self, replica: Replica, state: ReplicaState, detail: str) -> None:
        replica.detail = detail
        if replica.state is not state:
            log.info("replica %s: %s -> %s (%s)", replica.url, replica.state.value, state.value, detail)
            replica.state = state
            self._on_state_change(replica)
            self.notifier.notify()

    # ---- polling -------------------------------------------------------------------------------

    async def _poll(self, replica: Replica) -> None:
        while True:
            await self._probe(replica)
            if replica.is_routable and self.config.measure_rates:
                await self._scrape(replica)
            await asyncio.sleep(self.config.interval_s)

    async def _probe(self, replica: Replica) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self.session.get(replica.url + "/ready", timeout=timeout) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.record_failure(replica, f"/ready: {type(exc).__name__}")
            return
        if replica.state is ReplicaState.DRAINING:
            return
        if status != 200:
            replica.num_successes = 0
            if replica.state is ReplicaState.READY:
                self._set(replica, ReplicaState.NOT_READY, f"/ready answered {status}")
            return
        replica.num_failures = 0
        replica.num_successes += 1
        if replica.state is not ReplicaState.READY and replica.num_successes >= self.config.rise:
            self._set(replica, ReplicaState.READY, "ready")

    async def _scrape(self, replica: Replica) -> None:
        """Over the last interval: prefill rate = prompt tokens the replica's steps computed / the seconds
        those steps spent on them (its own counters, so queueing does not lower it: a rate divided by time
        to first token fell with every queued request and made replicas of one model look unequal); time
        per output token from its inter-token latency."""
        try:
            async with self.session.get(replica.url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=self.config.timeout_s)) as resp:
                if resp.status != 200:
                    return
                now = _counters(await resp.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return  # a server without kvloom's metrics: the router's default rate stands
        before, replica._last_counters = replica._last_counters, now
        if not before:
            return

        def delta(name):
            return now.get(name, 0.0) - before.get(name, 0.0)

        prefilled, prefill_s = delta(_PREFILL_TOKENS), delta(_PREFILL_S)
        if prefilled > 0 and prefill_s > 0:
            replica.prefill_tokens_per_s = self._blend(replica.prefill_tokens_per_s, prefilled / prefill_s)
        num_tokens = delta(_ITL_COUNT)
        if num_tokens > 0:
            replica.inter_token_s = self._blend(replica.inter_token_s,
                                                delta(_ITL_SUM) / num_tokens)

    def _blend(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.config.ewma) * old + self.config.ewma * new
