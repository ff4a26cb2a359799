"""The native decode-step matmul (kernels/cpu_linear.cc): its products against numpy's, through llama.linear
for a decode step's rows only, and the fallbacks where it cannot be built."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvloom.engine.models import llama
from kvloom.kernels import cpu_kernels

pytestmark = pytest.mark.timeout(120)


def _reference(x, w):
    """x [T, K] times w [N, K] in float64, from the values the kernel reads (x rounded to bfloat16 for
    bfloat16 weights; float16 weights are widened and x kept)."""
    x = jnp.asarray(x).astype(jnp.bfloat16) if w.dtype == jnp.bfloat16 else jnp.asarray(x)
    x = np.asarray(x.astype(jnp.float32), np.float64)
    return x @ np.asarray(w.astype(jnp.float32), np.float64).T


# rows: 1, a tile of 6 and its remainders, the most; K: whole vectors and a remainder (16 floats or 32
# bfloat16 per vector); N: a remainder of the 4-row tiles and of the 32-row chunks
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 32])
@pytest.mark.parametrize("k,n", [(64, 8), (100, 37), (576, 130), (40, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_products_match_numpy(kernels, rows, k, n, dtype):
    if not kernels.handles(rows, dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)), dtype)
    y = jax.jit(kernels.linear)(x, w)
    assert y.shape == (rows, n) and y.dtype == jnp.float32
    ref = _reference(x, w)
    # summation order differs from numpy's; products of bfloat16 or float16 values are exact in float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_llama_linear_takes_the_kernel_for_a_decode_steps_rows_only(kernels, dtype):
    if not kernels.handles(1, dtype):
        pytest.skip(f"no {dtype} kernel on this CPU")
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 2, 48)), dtype)  # [*out, K], as a fused weight is stored
    for rows in (1, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((rows, 48)), jnp.float32)
        fn = jax.jit(lambda x, w: llama.linear(x, w, kernels))
        hlo = fn.lower(x, w).as_text()
        assert ("custom_call" in hlo and kernels.digest in hlo) == (rows <= cpu_kernels.MAX_ROWS), rows
        if rows <= cpu_kernels.MAX_ROWS:  # the kernel reads the weight in place: no copy into a layout
            entry = fn.lower(x, w).compile().as_text().split("ENTRY")[1].splitlines()
            weight = next(line.split(" = ")[0].strip() for line in entry if "parameter(1)" in line)
            readers = [line for line in entry if f"({weight}" in line or f", {weight}" in line]
            assert readers and all(" bitcast(" in line or "custom-call(" in line for line in readers), readers
            assert not [line for line in entry if " copy(" in line or " transpose(" in line]
        y = fn(x, w)
        assert y.shape == (rows, 3, 2)
        np.testing.assert_allclose(np.asarray(y), np.asarray(llama.linear(x, w)), rtol=1e-5, atol=1e-4)


def test_a_machine_without_a_compiler_falls_back_to_xla(monkeypatch, tmp_path, caplog):
    if cpu_kernels.unavailable_reason() is not None:
        pytest.skip(cpu_kernels.unavailable_reason())
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or c++ on it
    assert cpu_kernels.unavailable_reason() == "no C++ compiler (set CXX, or install g++)"
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.load(str(tmp_path / "kernels")) is None
    assert "CPU kernels not used" in caplog.text


def test_a_failed_build_falls_back_to_xla_and_says_why(monkeypatch, tmp_path, caplog):
    if cpu_kernels.unavailable_reason() is not None:
        pytest.skip(cpu_kernels.unavailable_reason())
    failing = tmp_path / "bin" / "c++"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'c++: fatal error: no input' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.load(str(tmp_path / "kernels")) is None
    assert "failed" in caplog.text and "no input" in caplog.text
    assert not list((tmp_path / "kernels").iterdir())  # no half-written library left behind


def test_cpu_kernels_off_keeps_xla_s_dot(tiny_llama):
    from types import SimpleNamespace

    from kvloom.engine.config import ConfigError
    from kvloom.engine.runner import ModelRunner
    from tests.conftest import tiny_engine_config

    runner = SimpleNamespace(platform="cpu", mesh=SimpleNamespace(size=1), start_detail={})
    assert ModelRunner._native_kernels(runner, tiny_engine_config(tiny_llama, cpu_kernels="off")) is None
    with pytest.raises(ConfigError, match="cpu_kernels"):
        tiny_engine_config(tiny_llama, cpu_kernels="yes")
