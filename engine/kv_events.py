"""KV events: what a replica's radix cache stores and evicts, as a feed a router can mirror exactly.

Data flow (event loop thread only, like the cache itself):

    RadixCache.insert() / evict() / reset()  ─► KVEventLog.publish(kind, hashes)   (id = last_id + 1)
    a feed subscriber                         ─► log.snapshot() once, then log.since(id) as they come

A page is named by its chain hash: the hash of its parent page's hash and its own token ids
(`page_hashes`), so a hash names a whole prefix and the router matches a request by hashing
its prompt the same way. The cache is prefix-closed (eviction drops leaves only), so the set of
hashes a replica holds is too: a request's cached prefix is its longest run of known hashes.

Event ids are monotonic per log; the log outlives an engine restart (a restart publishes
"cleared"). A subscriber that fell out of the bounded history gets None from since() and takes
a fresh snapshot. Nothing here is process-global: each engine owns one log.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"
DEFAULT_HISTORY = 65536


def page_hashes(tokens: Sequence[int], page_size: int, parent: int = 0) -> list[int]:
    """Chain hashes of each whole page of `tokens` (a partial last page has none)."""
    hashes = []
    for start in range(0, len(tokens) - len(tokens) % page_size, page_size):
        data = parent.to_bytes(8, "little") + np.asarray(tokens[start:start + page_size], "<i4").tobytes()
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        hashes.append(parent)
    return hashes


class KVEventLog:
    """Numbered cache events with a bounded history and a wake-up for waiting subscribers."""

    def __init__(self, page_size: int, history: int = DEFAULT_HISTORY):
        self.page_size = page_size
        self.last_id = 0
        self._history: deque[dict] = deque(maxlen=history)
        self._changed = asyncio.Event()
        self._snapshot_source: Callable[[], Iterable[int]] = lambda: ()

    def attach(self, snapshot_source: Callable[[], Iterable[int]]) -> None:
        """The cache whose contents snapshot() lists (the newest one, after a restart)."""
        self._snapshot_source = snapshot_source

    def publish(self, kind: str, hashes: Sequence[int] = ()) -> None:
        if kind != CLEARED and not hashes:
            return
        self.last_id += 1
        self._history.append({"id": self.last_id, "type": kind, "hashes": list(hashes)})
        self._changed.set()
        self._changed = asyncio.Event()

    def snapshot(self) -> dict:
        """Every page hash the cache holds now, as of event `last_id`."""
        return {"id": self.last_id, "type": "snapshot", "page_size": self.page_size,
                "hashes": sorted(self._snapshot_source())}

    def since(self, last_seen: int) -> Optional[list[dict]]:
        """The events after `last_seen`, or None when some of them are no longer kept."""
        if last_seen >= self.last_id:
            return []
        if not self._history or self._history[0]["id"] > last_seen + 1:
            return None
        return [e for e in self._history if e["id"] > last_seen]

    async def wait_beyond(self, last_seen: int, timeout: float) -> None:
        """Return once an event after `last_seen` exists, or after `timeout` s."""
        if self.last_id > last_seen:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
