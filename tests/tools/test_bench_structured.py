"""tools.bench_structured: one tiny end-to-end run of main() on a tiny checkpoint."""

import json

import jax
import pytest

from kvloom.tools import bench_structured

pytestmark = pytest.mark.timeout(300)


def test_per_token_s():
    assert bench_structured.per_token_s([1.0]) is None
    assert bench_structured.per_token_s([1.0, 1.5, 3.0]) == pytest.approx(1.0)


def test_main_on_a_tiny_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = [
        "--model", tiny_llama, "--concurrency", "1,2", "--max-tokens", "8", "--repeats", "1",
        "--json", str(out),
        "--max-running", "4", "--max-model-len", "256", "--page-size", "4", "--num-pages", "512",
        "--chunk-size", "32", "--max-tokens-per-step", "64", "--max-prefill-seqs", "2",
        # keep the cache conftest chose: main() sets process-wide JAX config
        "--jax-cache-dir", jax.config.jax_compilation_cache_dir,
    ]
    bench_structured.main(argv)

    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    one, two = report["levels"]
    assert "mixed" not in one and "mixed" in two
    assert one["plain"]["plain_per_token_s"] > 0 and one["plain"]["constrained_per_token_s"] is None
    assert one["json_schema"]["plain_per_token_s"] is None
    for row in (one["json_schema"], two["json_schema"], two["mixed"]):
        assert row["constrained_per_token_s"] > 0 and 1 <= row["constrained_tokens"] <= 8
        assert set(row["constrained_finish"]) <= {"stop", "length"}
    assert two["mixed"]["plain_per_token_s"] > 0
    grammar = report["grammar"]
    assert grammar["compile_s"] > 0 and grammar["mask_and_accept_s"] > 0 and grammar["num_tokens"] > 0
    assert report["example_output"].startswith("{")
    sampler = report["sampler"]
    assert sampler["num_rows"] == 2
    assert all(sampler[f"{mode}_{kind}_s"] > 0 for mode in ("greedy", "sampled")
               for kind in ("plain", "bitmask"))

    printed = capsys.readouterr().out
    assert "json_schema ms/token" in printed and "bitmask + accept" in printed and "jitted sampler" in printed
