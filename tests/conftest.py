"""Shared fixtures: tiny checkpoints are built once per test process and reused read-only."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
