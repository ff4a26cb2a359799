"""tools.compare: its options, and one quick end-to-end run on a tiny checkpoint (kvloom in process
and over HTTP, transformers beside it, llama.cpp in process and llama-server skipped)."""

import json
import sys

import jax
import pytest

from kvloom.tools import compare, compare_workloads
from kvloom.tools.cli import build_parser

pytestmark = pytest.mark.timeout(180)


def test_quick_run_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed, whatever this machine has
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path / "cache"))  # no llama-server built there
    out = tmp_path / "compare.json"
    args = build_parser().parse_args([
        "compare", "--model", tiny_llama, "--quick", "--peers", "hf,llamacpp,llama-server:f16",
        "--json", str(out),
        "--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2",
        "--gguf-cache-dir", str(tmp_path / "gguf"),
        # keep the cache conftest chose: the run sets process-wide JAX config
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ])
    assert compare.main_from_args(args) == 0

    report = json.loads(out.read_text())
    assert report["peers"]["hf"]["status"] == "ok"
    llamacpp = report["peers"]["llamacpp:f32"]
    assert llamacpp["status"] == "skipped" and "llama-cpp-python is not installed" in llamacpp["message"]
    server = report["peers"]["llama-server:f16"]
    assert server["status"] == "skipped" and server["mode"] == "HTTP"
    assert server["label"] == "llama-server F16"
    assert "`kvloom build-llama-server`" in server["message"]
    assert not (tmp_path / "gguf").exists()  # skipped before converting anything
    assert report["roofline"]["compute_tok_s"] > 0 and report["roofline"]["memory_tok_s_batch1"] > 0
    assert report["machine"]["bandwidth"]["bytes_per_s"] > 0

    rows = {(r["key"], r["mode"]): r for r in report["rows"]}
    keys = ["decode@1", "decode@4", "prefill", "shared-prefix", "score"]
    assert set(rows) == {(k, m) for k in keys for m in ("in process", "HTTP")}
    for key in keys:
        local, http = rows[key, "in process"], rows[key, "HTTP"]
        assert local["kvloom"] > 0 and local["peers"]["hf"] > 0, key  # the transformers column is filled
        assert local["kvloom_over_peer"]["hf"] > 0 and 0 < local["kvloom_over_roofline"]
        assert local["peers"]["llamacpp:f32"] is None and local["kvloom_over_peer"]["llamacpp:f32"] is None
        assert http["kvloom"] > 0, key
        assert http["peers"] == {"hf": None, "llamacpp:f32": None, "llama-server:f16": None}, key
    assert report["measurements"]["hf"]["decode@4"]["num_tokens"] == 4 * compare_workloads.QUICK.new_tokens

    printed = capsys.readouterr().out
    assert "kvloom/transformers" in printed and "decode tok/s @4 (in process)" in printed
    assert "skipped: llama.cpp F32: llama-cpp-python is not installed" in printed
    assert "skipped: llama-server F16: llama-server is not built: `kvloom build-llama-server`" in printed


def test_dtype_sets_kvloom_s_weights_only():
    def config(*flags):
        args = build_parser().parse_args(["compare", *flags])
        return compare.engine_config(args, compare_workloads.sizes_from_args(args))

    assert config().dtype == "float32"
    assert config("--dtype", "bfloat16").dtype == "bfloat16"
    assert config("--dtype", "float16").dtype == "float16"
    assert compare.bytes_per_parameter("float16") == compare.bytes_per_parameter("bfloat16") == 2
    with pytest.raises(SystemExit):
        config("--dtype", "float64")
