"""tools.machine: the roofline arithmetic, and the machine measured for real at small sizes."""

import pytest

from kvloom.kernels import cpu_kernels
from kvloom.tools import machine
from kvloom.tools.machine import Roofline

pytestmark = pytest.mark.timeout(60)


def test_roofline_arithmetic():
    assert machine.roofline_tokens_per_s(100e9, 50_000_000) == pytest.approx(1000.0)
    roof = Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    assert roof.compute_tok_s == pytest.approx(1000.0)  # 100e9 / (2 x 50e6)
    assert roof.weight_bytes == 200_000_000  # float32
    assert roof.memory_tok_s == pytest.approx(100.0)  # 20e9 / 200e6, batch 1
    assert roof.decode_tok_s(1) == pytest.approx(100.0)
    assert roof.decode_tok_s(8) == pytest.approx(800.0)  # the batch shares each weight read
    assert roof.decode_tok_s(32) == pytest.approx(1000.0)  # compute-bound
    # the query once, then 16 items of 16 tokens: 384 tokens for 16 items
    assert roof.score_items_s(128, 16, 16) == pytest.approx(1000.0 * 16 / 384)
    assert roof.to_json()["peak_gflops"] == pytest.approx(100.0)


def test_measured_ceilings_are_positive():
    matmul = machine.measure_matmul_peak([32, 64], repeats=2)
    assert set(matmul["gflops_by_size"]) == {"32", "64"} and matmul["peak_gflops"] > 0
    assert matmul["dtype"] == "float32"
    bf16 = machine.measure_matmul_peak([32], repeats=1, dtype="bfloat16")
    assert bf16["dtype"] == "bfloat16" and bf16["peak_gflops"] > 0
    bandwidth = machine.measure_bandwidth(1 << 16, repeats=2)
    assert bandwidth["num_bytes"] == 1 << 16 and bandwidth["bytes_per_s"] == max(
        bandwidth["bytes_per_s_by_method"].values()) > 0
    assert machine.best_of(lambda: None, 3) >= 0
    for dtype in ("float32", "bfloat16"):
        reads = machine.measure_weight_reads(dtype, 1 << 18, repeats=2, shape=(32, 64))
        item = 4 if dtype == "float32" else 2
        assert reads["num_bytes"] == (1 << 18) // (32 * 64 * item) * 32 * 64 * item
        assert reads["bytes_per_s"] > 0
        assert reads["path"] == ("xla" if cpu_kernels.unavailable_reason() else "cpu kernel")
