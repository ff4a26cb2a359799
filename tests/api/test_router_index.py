"""Index sync: routers subscribed to the same replicas hold identical indexes (same last event id,
same pages) after the same traffic, including one that starts late, one that reconnects and one
that missed events (a gap, recovered by a snapshot); and all of them equal the replicas' caches."""

import aiohttp
import pytest

from kvloom.api.router_index import ApproximateReplicaIndex, PromptPages


pytestmark = pytest.mark.timeout(300)  # the shared tiny-checkpoint build counts on a loaded machine


def synced(router, replicas) -> bool:
    indexes = router.indexes
    return all(indexes[r.url].is_synced and indexes[r.url].last_event_id == r.engine.kv_events.last_id
               for r in replicas)


def contents(router, replicas) -> dict:
    indexes = router.indexes
    return {r.url: (indexes[r.url].last_event_id, frozenset(indexes[r.url].hashes)) for r in replicas}


def truth(replicas) -> dict:
    return {r.url: (r.engine.kv_events.last_id, frozenset(r.engine.kv_events.snapshot()["hashes"]))
            for r in replicas}


async def traffic(url, start: int, num: int = 12) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(start, start + num):
            prompt = [7 + i % 3] * 16 + [20 + i] * (4 + i % 9)  # three shared heads, own tails
            body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
            async with session.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()


async def test_two_routers_hold_identical_indexes_late_start_reconnect_and_gap(fleet):
    replicas = [await fleet.replica() for _ in range(2)]
    urls = [r.url for r in replicas]
    first, first_url = await fleet.router(urls)
    await first.wait_for(lambda: len(first.membership.routable()) == 2)
    await traffic(first_url, 0)

    late, _ = await fleet.router(urls)  # starts after 12 requests' worth of events
    for router in (first, late):
        await router.wait_for(lambda: synced(router, replicas))
    assert contents(first, replicas) == contents(late, replicas) == truth(replicas)
    assert all(first.indexes[u].last_event_id > 1 for u in urls)

    for u in urls:  # a dropped connection comes back with a snapshot
        late.feeds[u].reconnect()
    await late.wait_for(lambda: all(late.feeds[u].num_connects >= 2 for u in urls))
    await traffic(first_url, 12)
    for router in (first, late):
        await router.wait_for(lambda: synced(router, replicas))
    assert contents(first, replicas) == contents(late, replicas) == truth(replicas)

    index = late.indexes[urls[0]]  # an event lost in transit: the next one shows the gap
    num_snapshots = index.num_snapshots
    index.last_event_id -= 1
    await traffic(first_url, 24)
    await late.wait_for(lambda: index.num_snapshots > num_snapshots and synced(late, replicas))
    await first.wait_for(lambda: synced(first, replicas))
    assert late.feeds[urls[0]].num_gaps >= 1
    assert contents(first, replicas) == contents(late, replicas) == truth(replicas)


async def test_eviction_and_restart_reach_the_index(fleet):
    replica = await fleet.replica()
    router, url = await fleet.router([replica.url])
    await router.wait_for(lambda: router.membership.routable() != [])
    await traffic(url, 0, 6)
    await router.wait_for(lambda: synced(router, [replica]))
    assert router.indexes[replica.url].hashes
    replica.engine.scheduler.prefix_cache.evict(3)
    await router.wait_for(lambda: synced(router, [replica]))
    assert contents(router, [replica]) == truth([replica])
    await replica.engine.restart()  # a new cache: "cleared", ids keep counting
    await router.wait_for(lambda: synced(router, [replica]))
    assert contents(router, [replica]) == truth([replica])


async def test_a_replica_without_events_gets_an_approximate_index(fleet, aiohttp_plain_server):
    plain_url = aiohttp_plain_server
    replica = await fleet.replica()
    router, url = await fleet.router([replica.url, plain_url])
    await router.wait_for(lambda: not router.indexes[plain_url].is_exact)
    assert router.indexes[replica.url].is_exact
    assert router.status()["replicas"][1]["index"]["kind"] == "approximate"


@pytest.fixture
async def aiohttp_plain_server():
    """An OpenAI-ish server that has /ready but no KV events."""
    from aiohttp import web

    from kvloom.api.server import start_server

    async def ready(request):
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_get("/ready", ready)
    runner, url = await start_server(app)
    yield url
    await runner.cleanup()


def test_approximate_index_remembers_what_was_sent_until_the_ttl():
    now = [100.0]
    index = ApproximateReplicaIndex(page_size=4, ttl_s=10.0, clock=lambda: now[0])
    sent = PromptPages(list(range(18)))
    index.record_sent(sent)
    assert index.match(PromptPages(list(range(12)) + [99] * 8)) == 12  # whole pages of the shared head
    assert index.match(sent) == 16
    now[0] += 10.5
    assert index.match(sent) == 0
