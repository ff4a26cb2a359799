"""Shared fixtures: tiny checkpoints are built once per test process and reused read-only;
compiled executables are shared through JAX's persistent compilation cache."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JAX_CACHE = os.path.join(_ROOT, ".pytest_cache", "jax")
# Subprocesses (`kvloom serve`, `python -m kvloom ...`) import this checkout, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)


def pytest_configure(config):
    import jax

    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> path of a tiny random checkpoint directory."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = tiny_models.build_checkpoint(str(root / family), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints):
    return tiny_checkpoints("llama")


def tiny_engine_config(model: str, **overrides):
    """A small engine: 4 running requests, 64-token steps, 32-token chunks, pages of 4."""
    from kvloom.engine.config import CacheConfig, EngineConfig, SchedulerConfig

    scheduler = dict(max_running=4, max_tokens_per_step=64, chunk_size=32, max_prefill_seqs=2)
    scheduler.update(overrides.pop("scheduler", {}))
    cache = dict(page_size=4, num_pages=512)
    cache.update(overrides.pop("cache", {}))
    overrides.setdefault("max_model_len", 256)
    return EngineConfig(model=model, scheduler=SchedulerConfig(**scheduler),
                        cache=CacheConfig(**cache), **overrides)
