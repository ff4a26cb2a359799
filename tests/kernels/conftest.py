"""The native CPU kernels (kernels/cpu_kernels), built and loaded once per test module; a machine that
cannot build them skips the tests that take this fixture."""

import pytest

from kvloom.engine.config import cache_root
from kvloom.kernels import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernels cannot run here: {reason}")
    loaded = cpu_kernels.load(f"{cache_root()}/kernels")
    assert loaded is not None
    return loaded
