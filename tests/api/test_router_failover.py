"""Failures with in-process replicas: a replica that went away is retried around before the first
byte, taken out by the circuit breaker, probed back once it is ready again; routers and replicas
are independent objects, created and torn down in any order, leaving nothing behind."""

import random

import aiohttp
import pytest

from kvloom.api.router_membership import HealthConfig, ReplicaState

pytestmark = pytest.mark.timeout(300)  # the shared tiny-checkpoint build counts on a loaded machine


async def complete(session, url, i):
    body = {"prompt": [5, 6, i], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        return resp.status, resp.headers.get("X-Kvloom-Replica")


async def test_a_replica_that_went_away_is_retried_around_broken_and_probed_back(fleet):
    a, b = await fleet.replica(), await fleet.replica()
    port_b = int(b.url.rsplit(":", 1)[1])
    # Slow polls: the requests, not the poller, find out that b went away.
    router, url = await fleet.router([a.url, b.url], policy="round_robin",
                                     health=HealthConfig(interval_s=0.5, fall=2, rise=2, measure_rates=False))
    await router.wait_for(lambda: len(router.membership.routable()) == 2)
    await fleet.stop_replica(b)
    async with aiohttp.ClientSession() as session:
        results = [await complete(session, url, i) for i in range(6)]
        assert results == [(200, a.url)] * 6  # every request answered; those sent to b were retried on a
        retries = router.metrics.retries.labels("replica_failed")._value.get()
        assert retries >= 1
        assert router.membership.replicas[b.url].state is ReplicaState.DOWN
        b2 = await fleet.replica(port=port_b)  # the same address comes back
        await router.wait_for(lambda: router.membership.replicas[b2.url].is_routable)
        chosen = {(await complete(session, url, i))[1] for i in range(4)}
    assert chosen == {a.url, b2.url}


async def test_two_routers_four_replicas_any_teardown_order(fleet):
    rng = random.Random(0)
    for _ in range(2):
        replicas = [await fleet.replica() for _ in range(4)]
        urls = [r.url for r in replicas]
        routers = [await fleet.router(urls[:3], seed=1), await fleet.router(urls[1:], seed=1)]
        async with aiohttp.ClientSession() as session:
            for router, url in routers:
                await router.wait_for(lambda: len(router.membership.routable()) == 3)
                assert [(await complete(session, url, i))[0] for i in range(3)] == [200] * 3
        assert routers[0][0].policy.rng is not routers[1][0].policy.rng
        assert routers[0][0].session is not routers[1][0].session
        owners = [("router", r) for r, _ in routers] + [("replica", r) for r in replicas]
        rng.shuffle(owners)
        for kind, owner in owners:  # a router outliving its replicas, or the reverse, both work
            await (fleet.stop_router(owner) if kind == "router" else fleet.stop_replica(owner))
