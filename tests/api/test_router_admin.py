"""Replicas added, drained and removed at run time through the admin routes (off by default)."""

import aiohttp
import pytest

from kvloom.api.router_membership import ReplicaState

pytestmark = pytest.mark.timeout(300)  # the shared tiny-checkpoint build counts on a loaded machine


async def post(session, url, path, body):
    async with session.post(url + path, json=body) as r:
        return r.status, await r.json()


async def test_admin_routes_add_drain_remove(fleet):
    a, b = await fleet.replica(), await fleet.replica()
    router, url = await fleet.router([a.url], enable_admin=True)
    plain, plain_url = await fleet.router([a.url])
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, plain_url, "/admin/replicas", {"url": b.url})
        assert status == 404 and body["error"]["code"] == "not_found"  # off unless enabled
        status, body = await post(session, url, "/admin/replicas", {"url": "not a url"})
        assert status == 400 and body["error"]["param"] == "url"
        status, body = await post(session, url, "/admin/replicas", {"url": b.url})
        assert status == 200 and body["state"] == "pending"
        await router.wait_for(lambda: len(router.membership.routable()) == 2)
        status, body = await post(session, url, "/admin/replicas/drain", {"url": a.url})
        assert status == 200 and body["state"] == ReplicaState.DRAINING.value
        for i in range(4):  # a draining replica gets nothing new
            async with session.post(url + "/v1/completions", json={"prompt": [4, i], "max_tokens": 2}) as r:
                assert r.status == 200 and r.headers["X-Kvloom-Replica"] == b.url
        status, _ = await post(session, url, "/admin/replicas/remove", {"url": b.url})
        assert status == 200 and b.url not in router.indexes and b.url not in router.feeds
        async with session.post(url + "/v1/completions", json={"prompt": [4], "max_tokens": 2}) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "no_ready_replica"
        status, body = await post(session, url, "/admin/replicas/remove", {"url": b.url})
        assert status == 404 and body["error"]["param"] == "url"
