"""tools.accel_bench: each plan's command lines parse in the benchmarks they run, the summary of their
reports (figures, the gate, failed phases), and a checkpoint built once then reused."""

import pytest

from kvloom.tools import accel_bench, bench_engine, bench_score

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("plan", [accel_bench.FULL, accel_bench.TINY], ids=["full", "tiny"])
def test_plans_parse_in_the_benchmarks(plan):
    extra = ["--compile-cache", ""]
    engine = bench_engine.build_parser().parse_args(
        accel_bench.phase_argv(plan, "engine", "/ckpt", "bfloat16", "/out/e.json", extra)[3:])
    assert engine.model == "/ckpt" and engine.dtype == "bfloat16" and engine.json == "/out/e.json"
    assert engine.concurrency == list(plan.concurrency) and engine.long_prompt_tokens == plan.prefill_tokens
    assert not engine.hf and engine.compile_cache == ""
    score = bench_score.build_parser().parse_args(
        accel_bench.phase_argv(plan, "score", "/ckpt", "float32", "/out/s.json", ["--modes", "packed"])[3:])
    assert score.dtype == "float32" and score.modes == ["packed"] and not score.hf
    assert score.min_items_per_s == accel_bench.MIN_ITEMS_PER_S
    assert (score.query_tokens, score.num_items, score.item_tokens) == (
        plan.query_tokens, plan.num_items, plan.item_tokens)


def test_full_plan_is_the_requested_workload():
    plan = accel_bench.FULL
    assert plan.shape == "qwen3-0.6b" and plan.concurrency == (1, 8, 32) and plan.prefill_tokens == 512
    assert (plan.query_tokens, plan.num_items, plan.item_tokens) == (2000, 500, 20)
    assert accel_bench.MIN_ITEMS_PER_S == 400


def engine_report(prefill_s):
    return dict(throughput=[dict(concurrency=c, kvloom_tok_s=10.0 * c) for c in (1, 8, 32)],
                ttft=[dict(prompt_tokens=32, cold_s=0.01), dict(prompt_tokens=512, cold_s=prefill_s)],
                parallel=dict(platform="gpu", devices=["cuda:0"]), num_parameters=596_049_920)


def score_report(items_per_s):
    gate = bench_score.gate_verdict([dict(mode="packed", kvloom_items_per_s=items_per_s)], 400.0)
    return dict(throughput=[dict(mode="packed", kvloom_items_per_s=items_per_s)], gate=gate)


def summary(rows, phases):
    result, status = accel_bench.overall(phases, rows)
    return dict(shape="qwen3-0.6b", min_items_per_s=400.0, concurrency=[1, 8, 32], prefill_tokens=512,
                device=dict(platform="gpu", devices=["cuda:0"]), num_parameters=596_049_920, rows=rows,
                phases=phases, result=result), status


def phase(benchmark, dtype, rc=0, report=True):
    return dict(benchmark=benchmark, dtype=dtype, rc=rc,
                report=f"{benchmark}-{dtype}.json" if report else None)


def test_summary_of_passing_and_failing_runs():
    plan = accel_bench.FULL
    bf16 = accel_bench.summary_row(plan, "bfloat16", engine_report(0.05), score_report(812.5))
    assert bf16["decode_tok_s"] == {"1": 10.0, "8": 80.0, "32": 320.0}
    assert bf16["prefill_ms"] == pytest.approx(50.0) and bf16["prefill_tok_s"] == pytest.approx(512 / 0.05)
    f32 = accel_bench.summary_row(plan, "float32", engine_report(0.1), score_report(250.0))
    phases = [phase(b, d) for d in ("bfloat16", "float32") for b in ("score", "engine")]
    phases[2]["rc"] = 1  # the float32 gate failed: its report is there

    s, status = summary([bf16, f32], phases)
    assert status == 1 and s["result"] == "FAIL (scoring gate, float32)"
    text = "\n".join(accel_bench.summary_lines(s))
    assert "596.0M params, on gpu (cuda:0)" in text
    bf16_line = next(line for line in text.splitlines() if line.startswith("bfloat16"))
    assert bf16_line.split()[1:] == ["10.0", "80.0", "320.0", "50.0", "10240", "812.5", "packed", "PASS"]
    assert next(line for line in text.splitlines() if line.startswith("float32")).endswith("FAIL")
    assert "score float32: exit status 1 (report written)" in text

    s, status = summary([bf16], [phase("score", "bfloat16"), phase("engine", "bfloat16")])
    assert status == 0 and s["result"] == "PASS"


def test_a_phase_without_a_report_is_an_error():
    row = accel_bench.summary_row(accel_bench.FULL, "bfloat16", None, score_report(900.0))
    assert row["decode_tok_s"] == {} and row["prefill_ms"] is None
    s, status = summary([row], [phase("score", "bfloat16"), phase("engine", "bfloat16", rc=-9, report=False)])
    assert status == 2 and s["result"] == "ERROR (engine bfloat16 failed)"
    text = "\n".join(accel_bench.summary_lines(s))
    assert "engine bfloat16: exit status -9 (no report)" in text
    assert next(line for line in text.splitlines() if line.startswith("bfloat16")).split()[1:4] == ["-"] * 3


def test_checkpoint_is_built_once_per_shape_and_seed(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(accel_bench, "build_shape", lambda path, shape, seed: built.append((shape, seed)))
    path = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    assert accel_bench.ensure_checkpoint(path, "tiny", 0) == path
    accel_bench.ensure_checkpoint(path, "tiny", 0)
    assert built == [("tiny", 0)]
    accel_bench.ensure_checkpoint(path, "tiny", 1)  # another seed: built again
    assert built == [("tiny", 0), ("tiny", 1)]
