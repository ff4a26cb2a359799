"""KV cache sizing: from the running requests and context by default, or an explicit page count or memory
fraction; always capped below the available memory and large enough for one sequence."""

import pytest

from kvloom.engine.config import CacheConfig, ConfigError
from kvloom.engine.kv_sizing import plan_kv_cache

GIB = 2**30


def plan(cache=None, *, max_running=32, max_model_len=2048, bytes_per_token=46080, available_bytes=16 * GIB):
    return plan_kv_cache(cache or CacheConfig(), max_running=max_running, max_model_len=max_model_len,
                         bytes_per_token=bytes_per_token, available_bytes=available_bytes)


def test_default_holds_the_running_requests_plus_prefix_cache_headroom():
    p = plan()
    running_pages = 32 * 2048 // 16
    assert p.sized_by == "max_running"
    assert p.num_pages == running_pages + running_pages // 8 + 1
    assert p.num_bytes == p.num_pages * 16 * 46080 and p.num_tokens == p.num_pages * 16
    assert p.detail == "32 running requests x 2048 tokens, plus 12.5% headroom for the prefix cache"
    # the default model (SmolLM2-135M, float32) with the default scheduler: a few GiB, whatever the machine
    assert 3 * GIB < p.num_bytes < 3.5 * GIB
    assert plan(available_bytes=200 * GIB) == p


def test_default_does_not_depend_on_free_memory_but_is_capped_by_it():
    p = plan(available_bytes=2 * GIB)
    assert p.num_bytes <= 0.9 * 2 * GIB
    assert p.detail.endswith("capped at 90% of the available memory")
    assert plan(CacheConfig(max_num_pages=4000)).num_pages == 4000


def test_explicit_page_count_wins():
    p = plan(CacheConfig(num_pages=300, memory_fraction=0.5))
    assert (p.num_pages, p.sized_by, p.detail) == (300, "num_pages", "300 pages, as configured")


def test_memory_fraction_option():
    p = plan(CacheConfig(memory_fraction=0.25), available_bytes=8 * GIB)
    assert p.sized_by == "memory_fraction"
    assert p.num_pages == int(2 * GIB // (16 * 46080))
    assert p.detail == "0.25 of the 8.0 GiB of available memory"


def test_headroom_is_configurable():
    assert plan(CacheConfig(prefix_cache_headroom=0)).num_pages == 32 * 128 + 1
    with pytest.raises(ConfigError, match="^prefix_cache_headroom"):
        CacheConfig(prefix_cache_headroom=-1)
    with pytest.raises(ConfigError, match="^memory_fraction"):
        CacheConfig(memory_fraction=0.95)


def test_too_small_for_one_sequence_names_num_pages():
    with pytest.raises(ValueError, match=r"^num_pages: 100 pages of 16 tokens cannot hold one sequence"):
        plan(CacheConfig(num_pages=100))
    with pytest.raises(ValueError, match=r"^num_pages: .*capped at 90% of the available memory"):
        plan(available_bytes=10 * 2**20)
