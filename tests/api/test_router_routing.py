"""Routing decisions through the real router app, fake-runner replicas behind the real server app:
a shared prefix goes where it is cached, load moves new requests away, a replica that is not
ready gets nothing, ties are decided by the router's seed alone."""

import asyncio
import dataclasses
import subprocess
import sys

import aiohttp
import pytest

from kvloom.api.router_index import PromptPages
from kvloom.api.router_membership import Replica, ReplicaState
from kvloom.api.router_policy import Policy
from tests.api.router_helpers import wait_until

pytestmark = pytest.mark.timeout(300)  # the shared tiny-checkpoint build counts on a loaded machine

PREFIX = list(range(10, 42))  # 32 tokens: 8 pages of 4


async def complete(session, url, prompt, max_tokens=4, stream=False):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    async with session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.read()
        return resp.status, resp.headers.get("X-Kvloom-Replica"), resp.headers.get(
            "X-Kvloom-Cached-Tokens-Predicted"), data


def synced(router, replicas):
    indexes = router.indexes
    return all(indexes[r.url].is_synced and indexes[r.url].last_event_id == r.engine.kv_events.last_id
               for r in replicas)


async def test_shared_prefix_routes_to_the_replica_that_holds_it(fleet):
    a, b = await fleet.replica(), await fleet.replica()
    router, url = await fleet.router([a.url, b.url])
    await router.wait_for(lambda: len(router.membership.routable()) == 2 and synced(router, [a, b]))
    async with aiohttp.ClientSession() as session:
        status, first, predicted, _ = await complete(session, url, PREFIX + [50, 51, 52, 53])
        assert status == 200 and predicted == "0"
        holder = next(r for r in (a, b) if r.url == first)
        await router.wait_for(lambda: synced(router, [a, b]) and router.indexes[holder.url].hashes)
        for i in range(6):
            status, chosen, predicted, body = await complete(session, url, PREFIX + [60 + i] * 8)
            assert status == 200 and chosen == first, body
            assert predicted == str(len(PREFIX))
    metrics = router.metrics.render().decode()
    assert f'kvloom_router_predicted_cached_tokens_total{{replica="{first}"}} 192.0' in metrics
    assert f'kvloom_router_actual_cached_tokens_total{{replica="{first}"}} 192.0' in metrics


async def test_imbalanced_load_moves_new_requests_away(fleet):
    a, b = await fleet.replica(), await fleet.replica()
    router, url = await fleet.router([a.url, b.url])
    await router.wait_for(lambda: len(router.membership.routable()) == 2 and synced(router, [a, b]))
    async with aiohttp.ClientSession() as session:
        _, first, _, _ = await complete(session, url, PREFIX)
        holder = next(r for r in (a, b) if r.url == first)
        other = b if holder is a else a
        await router.wait_for(lambda: synced(router, [a, b])
                              and router.indexes[holder.url].match(PromptPages(PREFIX)) == len(PREFIX))
        holder.gate.clear()  # the holder's steps stop: what is sent there stays queued
        other.gate.clear()  # the other's too: a request sent there stays in flight until the end (a fast
        # fake step could finish it between two polls of num_in_flight, and the wait below would miss it)
        rh, ro = router.membership.replicas[holder.url], router.membership.replicas[other.url]
        prompts = [PREFIX + [100 + i] * 32 for i in range(3)]  # 32 cached + 32 new tokens each
        tasks = [asyncio.ensure_future(complete(session, url, prompts[0]))]
        await wait_until(lambda: rh.num_in_flight == 1)  # cost 32 vs 64 on the other: the holder
        tasks.append(asyncio.ensure_future(complete(session, url, prompts[1])))
        await wait_until(lambda: rh.num_in_flight == 2)  # 64 vs 64: a tie, more cached tokens win
        tasks.append(asyncio.ensure_future(complete(session, url, prompts[2])))
        await wait_until(lambda: ro.num_in_flight == 1)  # 96 vs 64: away from the loaded replica
        assert rh.num_in_flight == 2
        holder.gate.set()
        other.gate.set()
        results = await asyncio.gather(*tasks)
    assert [r[1] for r in results] == [holder.url, holder.url, other.url]
    assert all(r[0] == 200 for r in results)


async def test_a_replica_that_is_not_ready_never_gets_traffic(fleet):
    a = await fleet.replica()
    warmup = asyncio.Event()
    cold = await fleet.replica(warmup_gate=warmup)
    router, url = await fleet.router([a.url, cold.url])
    await router.wait_for(lambda: router.membership.replicas[a.url].is_routable)
    async with aiohttp.ClientSession() as session:
        for i in range(8):
            status, chosen, _, _ = await complete(session, url, [5 + i, 6, 7])
            assert status == 200 and chosen == a.url
        async with session.get(url + "/ready") as r:
            assert r.status == 200
        assert router.membership.replicas[cold.url].state is ReplicaState.PENDING
        assert cold.engine.metrics.requests_finished.labels("length")._value.get() == 0
        warmup.set()
        await router.wait_for(lambda: router.membership.replicas[cold.url].is_routable)
        chosen = {(await complete(session, url, [9, 9, i]))[1] for i in range(16)}
    assert chosen == {a.url, cold.url}  # once ready, it takes its share


async def test_no_ready_replica_is_a_503_at_once(fleet):
    warmup = asyncio.Event()
    cold = await fleet.replica(warmup_gate=warmup)
    router, url = await fleet.router([cold.url])
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/ready") as r:
            assert r.status == 503
        async with session.post(url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}]}) as r:
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "no_ready_replica"
        async with session.post(url + "/v1/completions", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "invalid_json"
        async with session.post(url + "/v1/nothing", json={}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    warmup.set()


TIE_SEQUENCE = """
from kvloom.api.router_membership import Replica, ReplicaState
from kvloom.api.router_policy import Policy

def tie_sequence(seed):
    replicas = [Replica(f"http://r{i}") for i in range(4)]
    for r in replicas:
        r.state = ReplicaState.READY
    policy = Policy("prefix", seed)
    return [policy.rank(replicas, None, lambda r, p: 0)[0].replica.url for _ in range(32)]
"""


def test_ties_are_decided_by_the_seed_alone_across_processes():
    namespace = {}
    exec(TIE_SEQUENCE, namespace)
    here = namespace["tie_sequence"](7)
    code = TIE_SEQUENCE + "\nprint(','.join(tie_sequence(7)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           check=True)
    assert other.stdout.strip().split(",") == here
    assert len(set(here)) == 4  # all four replicas take a share
    assert namespace["tie_sequence"](8) != here


def test_tie_breaks_prefer_cached_tokens_then_fewer_in_flight():
    a, b = Replica("http://a"), Replica("http://b")
    for r in (a, b):
        r.state = ReplicaState.READY
    b.num_in_flight = 1  # same cost (nothing queued), b busier
    for seed in range(20):
        assert Policy("prefix", seed).rank([b, a], None, lambda r, p: 0)[0].replica is a
    round_robin = Policy("round_robin", 0)
    assert [round_robin.rank([a, b], None, lambda r, p: 0)[0].replica for _ in range(4)] == [a, b, a, b]


async def test_each_replica_s_rates_are_measured_from_its_metrics(fleet):
    """With rate measuring on, the router reads each replica's prefill rate and time per output token
    from its /metrics (the cost's inputs; until then a default rate stands)."""
    from tests.api.router_helpers import FAST_HEALTH

    a = await fleet.replica()
    health = dataclasses.replace(FAST_HEALTH, measure_rates=True)
    router, url = await fleet.router([a.url], health=health)
    await router.wait_for(lambda: len(router.membership.routable()) == 1)
    replica = router.membership.replicas[a.url]
    assert replica.prefill_tokens_per_s is None and replica.inter_token_s is None
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            status, _, _, _ = await complete(session, url, [7, 8, 9 + i] * 5, max_tokens=6)
            assert status == 200
    await wait_until(lambda: replica.prefill_tokens_per_s is not None and replica.inter_token_s is not None)
    assert replica.prefill_tokens_per_s > 0 and replica.inter_token_s > 0
