"""The router's subscription to one replica's KV events (GET /v1/kv_events).

Data flow: `KVFeed` runs one task on the router's loop: connect, apply the snapshot and every
event line to the replica's `ExactReplicaIndex`, and on a gap, a dropped connection or a silent
feed (no line for 3 heartbeats) reconnect, which always starts with a fresh snapshot. A replica
that answers 404 offers no events: the feed reports it (`on_no_events`) and asks again after
`retry_no_events_s`. Every change wakes the router's notifier.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

import aiohttp
import orjson

from kvloom.api.router_index import ExactReplicaIndex
from kvloom.api.router_notify import Notifier

log = logging.getLogger(__name__)


class KVFeed:
    def __init__(self, session: aiohttp.ClientSession, url: str, index: ExactReplicaIndex, notifier: Notifier,
                 *, heartbeat_s: float, retry_s: float, on_no_events: Callable[[], None],
                 retry_no_events_s: float = 10.0):
        self.session, self.url, self.index, self.notifier = session, url, index, notifier
        self.heartbeat_s, self.retry_s, self.retry_no_events_s = heartbeat_s, retry_s, retry_no_events_s
        self.on_no_events = on_no_events
        self.num_connects = 0
        self.num_gaps = 0
        self._response: Optional[aiohttp.ClientResponse] = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"router-feed {url}")

    def reconnect(self) -> None:
        """Drop the connection now; the feed comes back with a snapshot."""
        if self._response is not None:
            self._response.close()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            delay = self.retry_s
            try:
                if not await self._follow():
                    self.on_no_events()
                    delay = self.retry_no_events_s
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError,
                    TypeError) as exc:  # a bad line counts as a dropped feed
                log.debug("kv feed %s: %s", self.url, exc)
            finally:
                self._response = None
            self.notifier.notify()
            await asyncio.sleep(delay)

    async def _follow(self) -> bool:
        """Read the feed until it ends or shows a gap; False when the replica has no feed."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=3 * self.heartbeat_s + 1.0)
        async with self.session.get(self.url + "/v1/kv_events", params={"heartbeat": str(self.heartbeat_s)},
                                    timeout=timeout) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            self._response = resp
            self.num_connects += 1
            pending = b""
            async for chunk in resp.content.iter_any():
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line and not self.index.apply(orjson.loads(line)):
                        self.num_gaps += 1
                        return True
                self.notifier.notify()
        return True
