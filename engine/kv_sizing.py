"""How many KV cache pages an engine allocates, and why.

By default the cache holds the work the scheduler may admit: `max_running` requests of
`max_model_len` tokens each, plus headroom for the prefix cache to keep finished prompts. Sized
so, several servers share one machine (the cache no longer grows with the machine's free memory).
Two explicit options override it: a page count, or a fraction of the available memory. Any size is
capped below the available memory and must hold one sequence of `max_model_len` tokens.

Pure arithmetic (plus reading /proc/meminfo in `available_memory_bytes`); no JAX.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from kvloom.engine.config import CacheConfig

MAX_AVAILABLE_FRACTION = 0.9  # the cache never takes more of the available memory than this


@dataclass(frozen=True)
class KVCachePlan:
    """The chosen size; `sized_by` is "num_pages", "memory_fraction" or "max_running"."""

    num_pages: int
    page_size: int
    num_bytes: int
    sized_by: str
    detail: str  # one sentence: how the number was reached

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    def as_dict(self) -> dict:
        return dict(asdict(self), num_tokens=self.num_tokens)


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_kv_cache(cache: CacheConfig, *, max_running: int, max_model_len: int, bytes_per_token: int,
                  available_bytes: int) -> KVCachePlan:
    """Raises ValueError (naming num_pages) when the size cannot hold one sequence of max_model_len."""
    page_size = cache.page_size
    bytes_per_page = bytes_per_token * page_size
    pages_per_seq = -(-max_model_len // page_size)
    if cache.num_pages is not None:
        num_pages, sized_by = cache.num_pages, "num_pages"
        detail = f"{num_pages} pages, as configured"
    elif cache.memory_fraction is not None:
        num_pages = int(available_bytes * cache.memory_fraction // bytes_per_page)
        sized_by = "memory_fraction"
        detail = f"{cache.memory_fraction:g} of the {available_bytes / 2**30:.1f} GiB of available memory"
    else:
        running_pages = max_running * pages_per_seq
        headroom = int(running_pages * cache.prefix_cache_headroom)
        num_pages, sized_by = running_pages + headroom + 1, "max_running"  # + the padding page
        detail = (f"{max_running} running requests x {max_model_len} tokens, plus "
                  f"{cache.prefix_cache_headroom * 100:g}% headroom for the prefix cache")
    if cache.num_pages is None:
        if num_pages > cache.max_num_pages:
            num_pages = cache.max_num_pages
            detail += f", capped at max_num_pages {cache.max_num_pages}"
        memory_cap = int(available_bytes * MAX_AVAILABLE_FRACTION // bytes_per_page)
        if num_pages > memory_cap:
            num_pages = memory_cap
            detail += f", capped at {MAX_AVAILABLE_FRACTION:.0%} of the available memory"
    if num_pages - 1 < pages_per_seq:
        raise ValueError(
            f"num_pages: {num_pages} pages of {page_size} tokens cannot hold one sequence of "
            f"max_model_len {max_model_len} ({detail}); give the cache more pages or lower max_model_len")
    return KVCachePlan(num_pages, page_size, num_pages * bytes_per_page, sized_by, detail)
