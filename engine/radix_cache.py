"""Prefix cache: a radix tree from token ids to the KV pages that hold them.

Data flow (all on the event loop thread; not thread-safe):

    admit:   m = cache.match_prefix(prompt, max_tokens=len(prompt) - 1)
             cache.lock(m.node); allocator.incref(m.pages)      # the request's own refs
             the rest: allocator.allocate(k), after cache.evict(shortfall) if the pool is short
    finish:  n = len(request_pages) (whole pages only)
             cache.insert(tokens[:n * page_size], request_pages[:n])
             cache.unlock(m.node); allocator.release(request_pages)

Contract, for `RadixCache` and `NoPrefixCache` alike:

- Page granular: every node spans whole pages (len(tokens) == len(pages) *
  page_size); a partial last page is never cached nor matched.
- References: the tree holds one allocator reference per page stored in it.
  Callers keep their own references and release them themselves; insert()
  never takes over a caller's reference, and where a span is already cached
  (maybe in other pages) the tree keeps its pages and takes no new reference.
- Who locks: the scheduler, on behalf of the request that reuses the matched
  pages, right after match_prefix() and before anything can evict (in the same
  synchronous step); it unlocks once when the request finishes, is preempted
  or aborted. lock() pins the node and all its ancestors; locks nest.
- When eviction is safe: always. evict() drops only unlocked leaves (trimming
  a leaf's tail when fewer pages are asked for), so pages a locked request
  reuses stay in the tree, and a dropped reference frees a page only when no
  request holds one too.
- Handles: a PrefixMatch.node is valid until the next evict() or reset();
  lock it before either runs. reset() makes every handle stale: lock() on a
  stale handle raises, unlock() ignores it.
- Stats count every query, cumulatively (reset() keeps them).
- Events: with a KVEventLog, every page stored, evicted or reset away is published
  under its chain hash (see kv_events.py), and the log's snapshot lists the tree.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from kvloom.engine.kv_events import CLEARED, REMOVED, STORED, KVEventLog, page_hashes
from kvloom.engine.pages import PageAllocator


@dataclass
class PrefixMatch:
    num_tokens: int  # matched tokens, a multiple of page_size
    pages: list[int]  # the pages holding them, in order
    node: object  # handle for lock()/unlock(); None when nothing matched; opaque to callers


class _Node:
    __slots__ = ("tokens", "pages", "parent", "children", "lock_count", "last_access", "is_stale")

    def __init__(self, tokens: tuple, pages: list[int], parent: Optional["_Node"], last_access: int):
        self.tokens = tokens  # len(tokens) == len(pages) * page_size
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple, _Node] = {}  # keyed by the child's first page of tokens
        self.lock_count = 0  # locks on this node or any descendant
        self.last_access = last_access
        self.is_stale = False  # evicted or reset away

    def __lt__(self, other: "_Node") -> bool:  # heap order: least recently used first
        return self.last_access < other.last_access


class PrefixCache:
    """The interface (see the module docstring); holds the query stats."""

    def __init__(self, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.num_queries = 0
        self.num_hits = 0
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def record_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += 1
        self.num_hits += num_hit_tokens > 0
        self.num_query_tokens += num_query_tokens
        self.num_hit_tokens += num_hit_tokens

    def _check_whole_pages(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        if len(tokens) != len(pages) * self.page_size:
            raise ValueError(
                f"insert needs whole pages: {len(tokens)} tokens != {len(pages)} pages * {self.page_size}"
            )


class RadixCache(PrefixCache):
    def __init__(self, allocator: PageAllocator, page_size: int, events: Optional[KVEventLog] = None):
        super().__init__(page_size)
        self.allocator = allocator
        self._clock = itertools.count(1)
        self._root = _Node((), [], None, 0)
        self._num_cached_pages = 0
        self._num_locked_pages = 0  # pages in nodes with lock_count > 0
        self.events = events
        if events is not None:  # a new cache (first start or restart): subscribers drop what they had
            events.attach(self.page_hashes)
            events.publish(CLEARED)

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        # An unlocked node has no locked descendant, so all of it can go.
        return self._num_cached_pages - self._num_locked_pages

    def match_prefix(self, tokens: Sequence[int], max_tokens: Optional[int] = None,
                     count_stats: bool = True) -> PrefixMatch:
        """Longest cached whole-page prefix of tokens[:max_tokens]; marks the path used.
        count_stats=False probes without counting a query (scheduling policies use it)."""
        tokens, ps = tuple(tokens), self.page_size
        limit = len(tokens) if max_tokens is None else max(0, min(max_tokens, len(tokens)))
        limit -= limit % ps
        now = next(self._clock)
        node, pos, pages = self._root, 0, []
        while pos < limit:
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            n = self._num_matching_pages(child, tokens, pos, limit)  # >= 1: the key matched
            child.last_access = now
            pages.extend(child.pages[:n])
            pos += n * ps
            node = child  # a partly matched node is the handle: locking it pins more, never less
            if n < len(child.pages):
                break
        if count_stats:
            self.record_query(len(tokens), pos)
        return PrefixMatch(pos, pages, node if pos else None)

    def lock(self, node: Optional[_Node]) -> None:
        if node is None:
            return
        if node.is_stale:
            raise ValueError("stale prefix handle: its node was evicted or the cache reset")
        while node is not self._root:
            if node.lock_count == 0:
                self._num_locked_pages += len(node.pages)
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: Optional[_Node]) -> None:
        if node is None or node.is_stale:
            return
        if node.lock_count == 0:
            raise ValueError("unlock() without a matching lock()")
        while node is not self._root:
            node.lock_count -= 1
            if node.lock_count == 0:
                self._num_locked_pages -= len(node.pages)
            node = node.parent

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Store a whole-page prefix; returns how many of its tokens were already cached."""
        self._check_whole_pages(tokens, pages)
        tokens, pages, ps = tuple(tokens), list(pages), self.page_size
        now = next(self._clock)
        node, i = self._root, 0  # i: pages of `tokens` already in the tree
        while i < len(pages):
            key = tokens[i * ps:(i + 1) * ps]
            child = node.children.get(key)
            if child is None:
                self.allocator.incref(pages[i:])
                node.children[key] = _Node(tokens[i * ps:], pages[i:], node, now)
                self._num_cached_pages += len(pages) - i
                if self.events is not None:
                    self.events.publish(STORED, page_hashes(tokens, ps)[i:])
                break
            n = self._num_matching_pages(child, tokens, i * ps, len(tokens))
            if n < len(child.pages) and i + n < len(pages):  # diverges inside child
                child = self._split(child, n)
            child.last_access = now
            node, i = child, i + n
        return i * ps

    def evict(self, num_pages: int) -> int:
        """Drop up to num_pages pages from least-recently-used unlocked leaves."""
        ps, num_dropped = self.page_size, 0
        heap = [n for n in self._nodes() if not n.children and n.lock_count == 0]
        heapq.heapify(heap)
        while heap and num_dropped < num_pages:
            leaf = heapq.heappop(heap)
            keep = max(0, len(leaf.pages) - (num_pages - num_dropped))
            dropped = leaf.pages[keep:]
            if self.events is not None:
                self.events.publish(REMOVED, page_hashes(self._path_tokens(leaf), ps)[-len(dropped):])
            if keep:  # the tail is enough; the prefix stays cached
                leaf.tokens, leaf.pages = leaf.tokens[:keep * ps], leaf.pages[:keep]
            else:
                parent = leaf.parent
                del parent.children[leaf.tokens[:ps]]
                leaf.is_stale = True
                if parent is not self._root and not parent.children and parent.lock_count == 0:
                    heapq.heappush(heap, parent)
            self.allocator.release(dropped)
            self._num_cached_pages -= len(dropped)
            num_dropped += len(dropped)
        return num_dropped

    def reset(self) -> None:
        """Drop every node and the cache's references; outstanding handles go stale."""
        pages = []
        for node in self._nodes():
            pages.extend(node.pages)
            node.is_stale = True
        self.allocator.release(pages)
        self._root = _Node((), [], None, 0)
        self._num_cached_pages = self._num_locked_pages = 0
        if self.events is not None:
            self.events.publish(CLEARED)

    def page_hashes(self) -> list[int]:
        """The chain hash of every cached page (what a KV-event snapshot lists)."""
        hashes, stack = [], [(child, 0) for child in self._root.children.values()]
        while stack:
            node, parent_hash = stack.pop()
            own = page_hashes(node.tokens, self.page_size, parent_hash)
            hashes.extend(own)
            stack.extend((child, own[-1]) for child in node.children.values())
        return hashes

    def _path_tokens(self, node: _Node) -> tuple:
        """Every token from the root to the end of `node`."""
        parts = []
        while node is not self._root:
            parts.append(node.tokens)
            node = node.parent
        return tuple(t for part in reversed(parts) for t in part)

    def _nodes(self) -> Iterator[_Node]:
        """Every node but the root."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _num_matching_pages(self, node: _Node, tokens: tuple, start: int, end: int) -> int:
        """How many of node's pages equal tokens[start:end], page by page from the first."""
        ps = self.page_size
        for i in range(min(len(node.pages), (end - start) // ps)):
            if tokens[start + i * ps:start + (i + 1) * ps] != node.tokens[i * ps:(i + 1) * ps]:
                return i
        return min(len(node.pages), (end - start) // ps)

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut node after its first n pages; returns the new upper node (same locks)."""
        ps = self.page_size
        upper = _Node(node.tokens[:n * ps], node.pages[:n], node.parent, node.last_access)
        upper.lock_count = node.lock_count  # node is upper's only descendant
        node.parent.children[upper.tokens[:ps]] = upper
        node.tokens, node.pages, node.parent = node.tokens[n * ps:], node.pages[n:], upper
        upper.children[node.tokens[:ps]] = node
        return upper


class NoPrefixCache(PrefixCache):
    """Caches nothing; same interface, so the scheduler has no `if cache:` branches."""

    def __init__(self, allocator: Optional[PageAllocator] = None, page_size: int = 1):
        super().__init__(page_size)
        self.allocator = allocator

    num_cached_pages = property(lambda self: 0)
    num_evictable_pages = property(lambda self: 0)

    def match_prefix(self, tokens: Sequence[int], max_tokens: Optional[int] = None,
                     count_stats: bool = True) -> PrefixMatch:
        if count_stats:
            self.record_query(len(tokens), 0)
        return PrefixMatch(0, [], None)

    def lock(self, node: object) -> None:
        pass

    def unlock(self, node: object) -> None:
        pass

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        self._check_whole_pages(tokens, pages)
        return 0

    def evict(self, num_pages: int) -> int:
        return 0

    def reset(self) -> None:
        pass


def make_prefix_cache(
    allocator: PageAllocator, page_size: int, enabled: bool, events: Optional[KVEventLog] = None
) -> Union[RadixCache, NoPrefixCache]:
    """The cache; with `events`, a radix cache publishes its changes there (no cache publishes none)."""
    if events is not None and not enabled:
        events.attach(lambda: ())
        events.publish(CLEARED)
    return RadixCache(allocator, page_size, events) if enabled else NoPrefixCache(allocator, page_size)
