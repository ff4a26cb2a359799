"""API fixtures: a real aiohttp server on a free loopback port, over a fresh engine per test."""

from dataclasses import dataclass

import pytest_asyncio

from kvloom.api.server import create_app, start_server
from kvloom.engine.engine import Engine
from tests import fake_runner
from tests.api.router_helpers import fleet  # noqa: F401 - the router tests' fixture
from tests.conftest import tiny_engine_config


@dataclass
class Served:
    engine: Engine
    url: str  # http://127.0.0.1:PORT

    @property
    def api(self) -> str:
        return self.url + "/v1"


async def serve_engine(engine: Engine, start: bool = True, **app_options):
    """Start the engine (unless told not to) and bind an app for it; returns (Served, cleanup)."""
    if start:
        await engine.start()
    runner, url = await start_server(create_app(engine, **app_options))

    async def cleanup():
        await runner.cleanup()
        await engine.stop()

    return Served(engine, url), cleanup


@pytest_asyncio.fixture
async def fake_server(tiny_llama):
    """The deterministic fake runner behind a real server: fast API tests."""
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=fake_runner.factory())
    served, cleanup = await serve_engine(engine)
    yield served
    await cleanup()
