"""tools.bench_dtype: one small run on a tiny checkpoint, and its combination parsing."""

import json

import jax
import pytest

from kvloom.engine.config import ConfigError
from kvloom.tools import bench_dtype


def test_combinations_are_checked_by_the_engine_config():
    assert bench_dtype.parse_combos("float32:auto, bfloat16:float32,float16") == [
        ("float32", "auto"), ("bfloat16", "float32"), ("float16", "auto")]
    with pytest.raises(ConfigError, match="^kv_cache_dtype: "):
        bench_dtype.parse_combos("float32:int4")


@pytest.mark.timeout(300)  # compiles the shapes of two engines: slow on a busy shared CPU
def test_main_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out.json"
    bench_dtype.main(["--model", tiny_llama, "--combos", "float32:auto,float32:bfloat16", "--new-tokens", "6",
                      "--speed-tokens", "3", "--batch", "2", "--probe-mib", "1", "--json", str(out),
                      # keep the cache conftest chose: main() sets process-wide JAX config
                      "--jax-cache-dir", jax.config.jax_compilation_cache_dir])
    report = json.loads(out.read_text())
    f32, bf16_kv = report["rows"]
    assert (f32["dtype"], f32["kv_cache_dtype"]) == ("float32", "float32")
    assert (bf16_kv["dtype"], bf16_kv["kv_cache_dtype"]) == ("float32", "bfloat16")
    assert f32["max_abs_logit_error"] < 1e-3  # the float32 engine is transformers' float32 model
    assert f32["greedy"] == dict(identical=4, prompts=4, mean_prefix=6.0)
    assert 0 < bf16_kv["max_abs_logit_error"] < 0.1
    assert bf16_kv["kv_bytes_per_token"] * 2 == f32["kv_bytes_per_token"]
    assert all(row["single_tok_s"] > 0 and row["batch_tok_s"] > 0 for row in report["rows"])
    # one probe per weights dtype
    assert f32["weight_read_bytes_per_s"] == bf16_kv["weight_read_bytes_per_s"] > 0
    printed = capsys.readouterr().out
    assert "kvloom precision:" in printed and "max |dlogit|" in printed and "decode tok/s @2" in printed
    assert "weight reads GB/s" in printed
