"""Router test fixtures: fake-runner replicas behind the real server app, routers in process,
and a check that nothing they started outlives the test (tasks, threads)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import pytest_asyncio

from kvloom.api.router_app import Router, RouterConfig, create_router_app
from kvloom.api.router_membership import HealthConfig
from kvloom.api.server import create_app, start_server
from kvloom.engine.engine import Engine
from tests import fake_runner
from tests.conftest import tiny_engine_config

FAST_HEALTH = HealthConfig(interval_s=0.02, timeout_s=10.0, fall=2, rise=2, measure_rates=False)


def router_config(urls, **overrides) -> RouterConfig:
    """A router that notices changes within milliseconds (tests wait on conditions, not time)."""
    overrides.setdefault("health", FAST_HEALTH)
    return RouterConfig(replicas=tuple(urls), feed_heartbeat_s=0.2, feed_retry_s=0.02, **overrides)


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """For counters nobody signals (in-flight requests): check on every loop turn until true."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0.002)
    await asyncio.wait_for(poll(), timeout)


@dataclass
class FakeReplica:
    engine: Engine
    url: str
    runner: object  # the aiohttp AppRunner
    gate: threading.Event  # steps wait on it: clear() holds every request in flight

    async def stop(self) -> None:
        self.gate.set()
        await self.runner.cleanup()
        await self.engine.stop()


class Fleet:
    """Replicas and routers of one test; close() stops whatever is left, in any order."""

    def __init__(self, model: str):
        self.model = model
        self.replicas: list[FakeReplica] = []
        self.routers: list[tuple[Router, object, str]] = []

    async def replica(self, *, port: int = 0, warmup_gate: Optional[asyncio.Event] = None,
                      start: bool = True) -> FakeReplica:
        gate = threading.Event()
        gate.set()
        engine = Engine(tiny_engine_config(self.model), runner_factory=fake_runner.factory(
            before_step=lambda batch: gate.wait(60)), warmup_gate=warmup_gate)
        runner, url = await start_server(create_app(engine), port=port)
        replica = FakeReplica(engine, url, runner, gate)
        self.replicas.append(replica)
        if start:
            if warmup_gate is None:
                await engine.start()
            else:
                replica.warmup_gate = warmup_gate
                replica.start_task = asyncio.ensure_future(engine.start())
        return replica

    async def stop_replica(self, replica: FakeReplica) -> None:
        """Stop a replica; one still held in warm-up finishes starting first (then stops like any other)."""
        self.replicas.remove(replica)
        task = getattr(replica, "start_task", None)
        if task is not None:
            replica.warmup_gate.set()
            await asyncio.gather(task, return_exceptions=True)
        await replica.stop()

    async def router(self, urls, **overrides) -> tuple[Router, str]:
        router = Router(router_config(urls, **overrides))
        await router.start()
        runner, url = await start_server(create_router_app(router))
        self.routers.append((router, runner, url))
        return router, url

    async def stop_router(self, router: Router) -> None:
        for entry in self.routers:
            if entry[0] is router:
                self.routers.remove(entry)
                await entry[1].cleanup()
                await router.close()
                return

    async def close(self) -> None:
        for router, _, _ in list(self.routers):
            await self.stop_router(router)
        for replica in list(self.replicas):
            await self.stop_replica(replica)


def _our_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith(("router-", "kvloom-compute"))}


@pytest_asyncio.fixture
async def fleet(tiny_llama):
    """A Fleet; afterwards no task of this test is left and no router or compute thread survives."""
    threads_before = _our_threads()
    fleet = Fleet(tiny_llama)
    try:
        yield fleet
    finally:
        await fleet.close()
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not left, f"tasks left running: {left}"
    for thread in _our_threads() - threads_before:
        thread.join(10)
    assert not (_our_threads() - threads_before), "threads left running"
