"""tools.bench_linear on tiny shapes: a row per dtype and row count, the kernel's columns where it runs."""

import pytest

from kvloom.kernels import cpu_kernels
from kvloom.tools import bench_linear

pytestmark = pytest.mark.timeout(120)


def test_prints_a_row_per_dtype_and_row_count(capsys):
    rows = bench_linear.main(["--rows", "1,33", "--dtypes", "float32,bfloat16", "--layers", "2",
                              "--hidden", "64", "--intermediate", "128", "--qkv", "96", "--vocab", "256",
                              "--repeats", "1"])
    assert [r[:2] for r in rows] == [["float32", "1"], ["float32", "33"],
                                     ["bfloat16", "1"], ["bfloat16", "33"]]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # XLA's dot: ms and GB/s
    if cpu_kernels.unavailable_reason() is None:
        assert float(rows[0][4]) > 0 and rows[1][4:] == ["-", "-"]  # the kernel takes up to 32 rows only
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["dtype", "rows", "XLA", "ms"]
