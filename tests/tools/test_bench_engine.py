"""tools.bench_engine: its pure helpers, and one tiny end-to-end run of main() on a tiny checkpoint."""

import json

import jax
import pytest

from kvloom.tools import bench_engine
from kvloom.tools.report import format_value


def test_roofline_and_ratios():
    assert bench_engine.roofline_tokens_per_s(100e9, 50_000_000) == pytest.approx(1000.0)
    assert bench_engine.throughput_target(32) == bench_engine.TARGETS["concurrent_32"]
    assert bench_engine.throughput_target(1) == bench_engine.TARGETS["single_stream"]
    assert bench_engine.throughput_target(8) == ""
    assert bench_engine.ttft_target(1500) == bench_engine.TARGETS["cached_ttft_1500"]


def test_format_row_aligns_and_shows_missing_values():
    fmt = format_value
    row = bench_engine.format_row(("decode tok/s @1 concurrent", fmt(12.345), fmt(None), fmt(2.0, suffix="x"),
                                   "target"))
    assert row.split() == ["decode", "tok/s", "@1", "concurrent", "12.35", "-", "2.00x", "target"]


@pytest.mark.timeout(240)  # compiles every step shape: slow on a busy shared CPU
def test_main_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = [
        "--model", tiny_llama, "--concurrency", "1,2", "--new-tokens", "4", "--prompt-tokens", "8",
        "--long-prompt-tokens", "40", "--ttft-repeats", "2", "--no-hf", "--json", str(out),
        "--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2",
        "--matmul-sizes", "64,128", "--matmul-repeats", "2",
        # keep the cache conftest chose: main() sets process-wide JAX config
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ]
    bench_engine.main(argv)

    report = json.loads(out.read_text())
    expected = {"model", "dtype", "num_parameters", "throughput", "ttft", "matmul", "roofline", "targets"}
    assert expected <= set(report)
    assert report["dtype"] == "float32" and report["num_parameters"] > 0

    assert [t["concurrency"] for t in report["throughput"]] == [1, 2]
    for t in report["throughput"]:
        assert t["kvloom_tok_s"] > 0 and t["kvloom_wall_s"] > 0
        assert t["hf_tok_s"] is None and t["ratio"] is None  # --no-hf

    assert [t["prompt_tokens"] for t in report["ttft"]] == [8, 40]
    for t in report["ttft"]:
        assert t["cold_s"] > 0 and t["cached_s"] > 0 and t["ratio"] > 0
        assert t["cold_cached_tokens"] == 0
        assert t["cached_tokens"] > 0  # the resubmitted prompt came from the radix prefix cache
    assert report["ttft"][1]["cached_tokens"] >= 40 - 4  # all full pages but the last token's

    assert report["matmul"]["peak_gflops"] > 0
    roofline = report["roofline"]
    assert roofline["concurrency"] == 2 and roofline["tok_s"] > 0 and 0 < roofline["fraction"]
    assert roofline["decode_tok_s"] == report["throughput"][-1]["kvloom_tok_s"]

    printed = capsys.readouterr().out
    assert "decode tok/s @2 concurrent" in printed and "of roofline" in printed


@pytest.mark.timeout(240)  # two engines compile their step shapes: slow on a busy shared CPU
def test_compare_speculative_on_a_tiny_checkpoint(tmp_path, capsys):
    from tests import tiny_models

    model = tiny_models.build_checkpoint(str(tmp_path / "model"), "llama", max_position_embeddings=1024)
    out = tmp_path / "out.json"
    bench_engine.main([
        "--compare-speculative", "--model", model, "--new-tokens", "24", "--json", str(out),
        "--max-model-len", "1024", "--page-size", "4", "--num-pages", "300", "--chunk-size", "32",
        "--max-tokens-per-step", "64", "--max-prefill-seqs", "1", "--num-speculative-tokens", "3",
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ])
    report = json.loads(out.read_text())
    assert report["speculative"]["method"] == "ngram" and report["speculative"]["num_speculative_tokens"] == 3
    assert report["engine_config"]["max_running"] == 1  # single stream
    assert [w["workload"] for w in report["workloads"]] == ["repeat", "chat"]
    for w in report["workloads"]:
        assert w["identical"] and w["tokens"] > 0 and w["plain_tok_s"] > 0 and w["speculative_tok_s"] > 0
        assert w["num_drafts"] > 0 and 1 <= w["mean_tokens_per_verify_step"] <= 4
    assert sum(w["num_accepted_tokens"] for w in report["workloads"]) > 0  # the random model loops
    printed = capsys.readouterr().out
    assert "tokens/verify step" in printed and "repeat" in printed
