"""What each replica's prefix cache holds, as the router knows it.

Two kinds of knowledge, one interface (`match(prompt) -> cached tokens`):

- `ExactReplicaIndex`: mirrors a replica's radix cache from its KV events (see
  engine/kv_events.py): a set of page chain hashes and the last event id applied. A snapshot
  replaces the set; an event must carry the next id, else apply() reports a gap and the feed
  reconnects for a snapshot.
- `ApproximateReplicaIndex`: for replicas that publish no events (any other OpenAI server):
  the pages of prompts the router itself sent there, each forgotten after a TTL.

`PromptPages` carries one request's token ids and hashes them lazily per page size.
Everything runs on the router's event loop, except PromptPages.precompute (a worker thread,
before the prompt is shared).
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from kvloom.engine.kv_events import CLEARED, REMOVED, STORED, page_hashes


class PromptPages:
    """A prompt's token ids and its page chain hashes per page size."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = list(token_ids)
        self._hashes: dict[int, list[int]] = {}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def hashes(self, page_size: int) -> list[int]:
        if page_size not in self._hashes:
            self._hashes[page_size] = page_hashes(self.token_ids, page_size)
        return self._hashes[page_size]

    def precompute(self, page_sizes: Sequence[int]) -> "PromptPages":
        for page_size in page_sizes:
            self.hashes(page_size)
        return self


def _num_matched(hashes: Sequence[int], holds: Callable[[int], bool]) -> int:
    n = 0
    while n < len(hashes) and holds(hashes[n]):
        n += 1
    return n


class ExactReplicaIndex:
    is_exact = True

    def __init__(self):
        self.page_size: Optional[int] = None  # known after the first snapshot
        self.last_event_id = 0
        self.hashes: set[int] = set()
        self.num_snapshots = 0

    @property
    def is_synced(self) -> bool:
        return self.page_size is not None

    def apply(self, message: dict) -> bool:
        """Apply one feed message; False on a gap (the caller reconnects for a snapshot)."""
        kind, event_id = message.get("type"), message.get("id")
        if kind == "snapshot":
            self.page_size, self.hashes = int(message["page_size"]), set(message["hashes"])
            self.last_event_id = event_id
            self.num_snapshots += 1
            return True
        if kind == "heartbeat":
            return event_id == self.last_event_id
        if not self.is_synced or event_id != self.last_event_id + 1:
            return False
        if kind == STORED:
            self.hashes.update(message["hashes"])
        elif kind == REMOVED:
            self.hashes.difference_update(message["hashes"])
        elif kind == CLEARED:
            self.hashes.clear()
        self.last_event_id = event_id
        return True

    def match(self, prompt: PromptPages) -> int:
        if not self.is_synced:
            return 0
        return _num_matched(prompt.hashes(self.page_size), self.hashes.__contains__) * self.page_size

    def record_sent(self, prompt: PromptPages) -> None:
        """Exact knowledge comes from the replica's own events, not from what was sent."""


class ApproximateReplicaIndex:
    is_exact = False

    def __init__(self, page_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.page_size, self.ttl_s, self.clock = page_size, ttl_s, clock
        self.expiry: dict[int, float] = {}

    def match(self, prompt: PromptPages) -> int:
        now = self.clock()
        return _num_matched(prompt.hashes(self.page_size),
                            lambda h: self.expiry.get(h, 0.0) > now) * self.page_size

    def record_sent(self, prompt: PromptPages) -> None:
        now = self.clock()
        if len(self.expiry) > 4 * 65536:  # bounded: drop what expired
            self.expiry = {h: t for h, t in self.expiry.items() if t > now}
        for h in prompt.hashes(self.page_size):
            self.expiry[h] = now + self.ttl_s
