"""tools.bench_score: its pure helpers, and one tiny end-to-end run of main() on a tiny checkpoint."""

import argparse
import json

import jax
import numpy as np
import pytest

from kvloom.tools import bench_score, machine


def test_roofline_items_per_s():
    # 2 FLOPs x 1M params x (100 + 10 x 10) tokens = 400 MFLOP per request of 10 items
    assert bench_score.total_tokens(100, 10, 10) == 200
    assert machine.roofline_items_per_s(400e6, 1_000_000, 100, 10, 10) == pytest.approx(10.0)


def test_latency_summary_and_relative_error():
    summary = bench_score.latency_summary([1.0, 2.0, 3.0, 4.0])
    assert summary["p50_s"] == pytest.approx(2.5) and 3.9 < summary["p99_s"] <= 4.0
    assert summary["max_s"] == 4.0
    assert bench_score.max_relative_error([[1.0, 2.2]], [[1.0, 2.0]]) == pytest.approx(0.1)


def test_parse_modes():
    assert bench_score.parse_modes("packed, batched") == ["packed", "batched"]
    for bad in ("", "packed,packed", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_score.parse_modes(bad)


def test_workload_ids_stay_in_the_vocabulary():
    args = argparse.Namespace(query_tokens=7, num_items=3, item_tokens=2, warmup_items=1)
    w = bench_score.make_workload(np.random.default_rng(0), 384, args)
    assert len(w["query"]) == 7 and len(w["items"]) == 3 and all(len(i) == 2 for i in w["items"])
    assert len(set(w["label_token_ids"])) == bench_score.NUM_LABELS
    every_id = (w["query"] + w["warmup_query"] + w["latency_query"] + w["label_token_ids"]
                + [t for i in w["items"] + w["warmup_items"] for t in i])
    assert all(0 <= t < 384 for t in every_id)
    assert w["query"] != w["warmup_query"] != w["latency_query"]


def test_gate_verdict_and_exit_status():
    throughput = [dict(mode="packed", kvloom_items_per_s=450.0),
                  dict(mode="batched", kvloom_items_per_s=399.5)]
    gate = bench_score.gate_verdict(throughput, 400.0)
    assert [m["passed"] for m in gate["modes"]] == [True, False] and not gate["passed"]
    assert bench_score.gate_lines(gate) == ["gate packed: 450.0 items/s >= 400: PASS",
                                            "gate batched: 399.5 items/s >= 400: FAIL"]
    assert bench_score.exit_status(dict(gate=gate)) == 1
    assert bench_score.gate_verdict(throughput[:1], 400.0)["passed"]
    assert bench_score.exit_status(dict(gate=bench_score.gate_verdict(throughput[:1], 400.0))) == 0
    assert bench_score.gate_verdict(throughput, None) is None and bench_score.gate_lines(None) == []
    assert bench_score.exit_status(dict(gate=None)) == 0


def test_dtype_flag_reaches_the_engine_config():
    args = bench_score.build_parser().parse_args(["--dtype", "bfloat16", "--modes", "batched"])
    assert bench_score.engine_config_for(args, "batched").dtype == "bfloat16"
    args = bench_score.build_parser().parse_args([])
    assert bench_score.engine_config_for(args, "packed").dtype == "float32"


@pytest.mark.timeout(180)
def test_main_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = [
        "--model", tiny_llama, "--query-tokens", "40", "--num-items", "12", "--item-tokens", "5",
        "--modes", "packed,batched", "--hf", "--hf-sample", "3", "--latency-items", "2,4", "--clients", "2",
        "--requests-per-point", "2", "--json", str(out), "--min-items-per-s", "1e-6",
        "--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--tokens-per-step", "64",
        "--max-items-per-step", "16", "--matmul-sizes", "64,128", "--matmul-repeats", "2",
        # keep the cache conftest chose: main() sets process-wide JAX config
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ]
    bench_score.main(argv)

    report = json.loads(out.read_text())
    expected = {"model", "dtype", "num_parameters", "settings", "engine_config", "throughput", "hf", "matmul",
                "roofline", "latency", "targets"}
    assert expected <= set(report)
    assert report["dtype"] == "float32" and report["num_parameters"] > 0
    assert all(0 <= t < 384 for t in report["settings"]["label_token_ids"])
    assert set(report["engine_config"]) == {"packed", "batched"}
    assert report["engine_config"]["batched"]["scoring"]["mode"] == "batched"

    assert [t["mode"] for t in report["throughput"]] == ["packed", "batched"]
    for t in report["throughput"]:
        assert t["num_items"] == 12 and t["total_tokens"] == 40 + 12 * 5
        assert t["kvloom_items_per_s"] > 0 and t["kvloom_wall_s"] > 0
        assert t["hf_items_per_s"] > 0 and t["ratio"] > 0

    hf = report["hf"]
    assert hf["num_items"] == 3 and hf["items_per_s"] > 0
    for err in hf["max_rel_err"].values():
        assert err < 1e-2  # the same items, scored by kvloom and by transformers

    assert report["matmul"]["peak_gflops"] > 0
    roofline = report["roofline"]
    assert roofline["items_per_s"] > 0 and roofline["total_tokens"] == 100
    assert [m["mode"] for m in roofline["modes"]] == ["packed", "batched"]
    assert all(m["fraction"] > 0 for m in roofline["modes"])

    latency = report["latency"]
    assert latency["mode"] == "packed" and latency["clients"] == 2
    assert latency["cold"]["num_items"] == 2 and latency["cold"]["latency_s"] > 0
    assert latency["cold"]["prefix_cache_hit_tokens"] == 0
    assert [p["num_items"] for p in latency["points"]] == [2, 4]
    for p in latency["points"]:
        assert p["num_requests"] == 4 and len(p["latencies_s"]) == 4
        assert 0 < p["p50_s"] <= p["p99_s"]
        assert p["prefix_cache_hit_tokens"] > 0  # the shared query came from the radix prefix cache

    printed = capsys.readouterr().out
    assert "items/s packed (12 items)" in printed and "% of roofline batched" in printed
    assert "prefix cache" in printed
    assert report["gate"]["passed"] and bench_score.exit_status(report) == 0
    assert "gate packed: " in printed and printed.rstrip().endswith("PASS")
