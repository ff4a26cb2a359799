"""tools.load.run_phase: exactly the requests asked for, at most C in flight, and the time limit."""

import asyncio
import itertools

import numpy as np
import pytest

from kvloom.tools.load import LoadPoint, run_phase
from kvloom.tools.workload import RequestSpec

pytestmark = pytest.mark.timeout(30)


def specs():
    return (RequestSpec(f"/{i}", {}, is_stream=False) for i in itertools.count())


async def test_an_open_loop_behind_its_clock_sends_no_more_than_asked():
    sent = []

    async def send(spec, rec):
        sent.append(spec.path)

    phase = await run_phase(send, specs(), LoadPoint(request_rate=1e6, arrival="constant"), num_requests=5,
                            duration_s=None, time_limit_s=20, rng=np.random.default_rng(0))
    assert sent == [f"/{i}" for i in range(5)] and len(phase.records) == 5 and not phase.is_time_limited


async def test_a_closed_loop_keeps_c_in_flight():
    in_flight, most = 0, 0

    async def send(spec, rec):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)  # let the other workers run
        in_flight -= 1

    phase = await run_phase(send, specs(), LoadPoint(concurrency=3), num_requests=7, duration_s=None,
                            time_limit_s=20, rng=np.random.default_rng(0))
    assert len(phase.records) == 7 and most == 3 and all(r.is_ok for r in phase.records)


async def test_the_time_limit_cancels_requests_in_flight():
    async def send(spec, rec):
        await asyncio.Event().wait()  # never answers

    phase = await run_phase(send, specs(), LoadPoint(concurrency=2), num_requests=4, duration_s=None,
                            time_limit_s=0.2, rng=np.random.default_rng(0))
    assert phase.is_time_limited and [r.error for r in phase.records] == ["time_limit"] * 2
