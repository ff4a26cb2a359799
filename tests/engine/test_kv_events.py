"""KV events from the radix cache: every store, eviction and reset is published under page chain
hashes, ids are consecutive, and replaying the events always gives the snapshot."""

import random

import pytest

from kvloom.engine.kv_events import KVEventLog, page_hashes
from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import RadixCache, make_prefix_cache

pytestmark = pytest.mark.timeout(60)


def replay(log: KVEventLog, events: list) -> set:
    held: set = set()
    for e in events:
        if e["type"] == "stored":
            held.update(e["hashes"])
        elif e["type"] == "removed":
            held.difference_update(e["hashes"])
        else:
            held.clear()
    return held


def fill(cache: RadixCache, alloc: PageAllocator, tokens: list) -> None:
    pages = alloc.allocate(len(tokens) // cache.page_size)
    cache.insert(tokens, pages)
    alloc.release(pages)


def test_page_hashes_name_whole_prefixes():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # the partial last page has none
    assert page_hashes([1, 2, 3, 4], 2) == a[:2]
    assert page_hashes([9, 2, 3, 4], 2)[1] != a[1]  # same page tokens, other prefix: other hash
    assert page_hashes([3, 4], 2, parent=a[0]) == a[1:2]


def test_store_split_evict_reset_publish_exactly_what_changed():
    alloc, log = PageAllocator(64), KVEventLog(page_size=2)
    cache = RadixCache(alloc, 2, log)
    assert [e["type"] for e in log.since(0)] == ["cleared"]
    fill(cache, alloc, [1, 2, 3, 4, 5, 6])
    fill(cache, alloc, [1, 2, 3, 4, 7, 8])  # splits the first node; only the new page is stored
    fill(cache, alloc, [1, 2, 3, 4])  # already cached: no event
    events = log.since(1)
    assert [e["type"] for e in events] == ["stored", "stored"]
    assert events[0]["hashes"] == page_hashes([1, 2, 3, 4, 5, 6], 2)
    assert events[1]["hashes"] == page_hashes([1, 2, 3, 4, 7, 8], 2)[2:]
    assert set(log.snapshot()["hashes"]) == replay(log, log.since(0))
    cache.evict(1)
    removed = log.since(3)
    assert [e["type"] for e in removed] == ["removed"] and len(removed[0]["hashes"]) == 1
    assert set(log.snapshot()["hashes"]) == replay(log, log.since(0))
    assert [e["id"] for e in log.since(0)] == list(range(1, log.last_id + 1))
    cache.reset()
    assert log.since(log.last_id - 1)[0]["type"] == "cleared" and log.snapshot()["hashes"] == []


def test_random_traffic_replays_to_the_snapshot():
    rng = random.Random(3)
    alloc, log = PageAllocator(40), KVEventLog(page_size=4, history=100000)
    cache = make_prefix_cache(alloc, 4, True, log)
    for _ in range(300):
        if rng.random() < 0.3:
            cache.evict(rng.randint(1, 6))
        else:
            n = 4 * rng.randint(1, 6)
            if cache.num_evictable_pages + alloc.num_free_pages < n // 4:
                continue
            if not alloc.can_allocate(n // 4):
                cache.evict(n // 4 - alloc.num_free_pages)
            fill(cache, alloc, [rng.randint(0, 3) for _ in range(n)])
        assert set(log.snapshot()["hashes"]) == replay(log, log.since(0))
    assert len(log.snapshot()["hashes"]) == cache.num_cached_pages


def test_history_overflow_means_snapshot():
    log = KVEventLog(page_size=1, history=3)
    for i in range(5):
        log.publish("stored", [i])
    assert log.since(0) is None  # events 1 and 2 are gone: the subscriber takes a snapshot
    assert [e["id"] for e in log.since(2)] == [3, 4, 5]
    assert log.since(5) == []


def test_no_prefix_cache_publishes_only_a_clear():
    log = KVEventLog(page_size=4)
    make_prefix_cache(PageAllocator(8), 4, False, log)
    assert [e["type"] for e in log.since(0)] == ["cleared"] and log.snapshot()["hashes"] == []
