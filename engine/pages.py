"""KV page allocator: a free list and a reference count per page.

Pages are indices into the paged KV cache. Page 0 is the padding sink (padded
slots of every batch write there), so it is never handed out. Holders are
requests (their page tables) and the prefix cache (pages stored in its tree);
each holder takes one reference and releases it exactly once. A page goes back
to the free list when its count reaches 0.

Invariant: a page is on the free list exactly when its count is 0 (page 0 is
never on it). Every call costs O(pages touched), never O(pool). Pure Python,
event-loop thread only.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Iterable

PADDING_PAGE = 0


class OutOfPagesError(RuntimeError):
    """Not enough free pages; nothing was allocated."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page {PADDING_PAGE} is reserved), got {num_pages}")
        self.num_pages = num_pages
        self._ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(1, num_pages))

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        _check_count(n)
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh pages, each with ref count 1; all or nothing."""
        _check_count(n)
        if n > len(self._free):
            raise OutOfPagesError(f"wanted {n} pages, only {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._ref_counts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Share pages that are in use; validates all before changing any."""
        pages = list(pages)
        for page in pages:
            if self._checked(page) == 0:
                raise ValueError(f"page {page} is free; only pages in use can be shared")
        for page in pages:
            self._ref_counts[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference per listed page; validates all before changing any."""
        pages = list(pages)
        for page, n in Counter(pages).items():
            if self._checked(page) < n:
                raise ValueError(
                    f"page {page} released {n} time(s) but has {self._ref_counts[page]} reference(s)"
                    " (double free)"
                )
        for page in pages:
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._free.append(page)

    def ref_count(self, page: int) -> int:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} out of range [0, {self.num_pages})")
        return self._ref_counts[page]

    def _checked(self, page: int) -> int:
        """The ref count of a page a caller may hold; ValueError for page 0 or out of range."""
        if page == PADDING_PAGE:
            raise ValueError(f"page {PADDING_PAGE} is the reserved padding page; it is never held")
        return self.ref_count(page)


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"page count must be >= 0, got {n}")
