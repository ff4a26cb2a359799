"""tools.profile_step: HLO parsing, the trace arithmetic, and one real traced run on a tiny checkpoint."""

import json

import jax
import jax.numpy as jnp
import pytest

from kvloom.engine import spans
from kvloom.tools import profile_step as ps


def test_parse_hlo_names_each_op_with_its_scope_and_finds_the_matmuls():
    @jax.jit
    def f(x, w):
        with jax.named_scope("mlp"):
            y = jax.nn.silu(x @ w)
        with jax.named_scope("sampling_part"):
            return jnp.argmax(y, axis=-1)

    text = f.lower(jnp.ones((4, 32)), jnp.ones((32, 64))).compile().as_text()
    module, ops = ps.parse_hlo(text)
    assert module.startswith("jit_f")
    matmuls = [op for op in ops.values() if op.is_matmul]
    assert matmuls and all("/mlp/" in op.op_name for op in matmuls)
    assert ps.device_part(module, "any", matmuls[0]) == "MLP (+ norm, activation)"
    assert not any(op.is_matmul for op in ops.values() if "sampling_part" in op.op_name)


def test_an_op_without_metadata_is_named_after_its_inputs():
    """XLA's library fusions of the attention's products carry no op_name: they take the scope of the
    nearest input that has one (through unnamed ones), and stay unnamed when none has."""
    names = {"copy.1": "jit(f)/attention/transpose", "bitcast.2": "", "ynn_fusion.3": "",
             "param.4": "", "dot.5": "", "mul.6": "jit(f)/mlp/mul", "dot.7": ""}
    operands = {"bitcast.2": ["copy.1"], "ynn_fusion.3": ["param.4", "bitcast.2"], "dot.5": ["param.4"],
                "dot.7": ["mul.6", "copy.1"]}
    resolved = ps._inherit_names(names, operands)
    assert resolved["ynn_fusion.3"] == "jit(f)/attention/transpose"
    assert resolved["dot.5"] == "" and resolved["param.4"] == ""
    assert resolved["dot.7"] == "jit(f)/mlp/mul"  # the first input with a scope
    assert resolved["copy.1"] == names["copy.1"]


def test_device_parts_by_module_and_scope():
    info = lambda name, opcode="fusion", mm=False: ps.OpInfo(name, opcode, mm)  # noqa: E731
    assert ps.device_part("jit_sample", "fusion.1", None) == "sampling"
    assert ps.device_part("jit_forward_logits", "x", info("jit(f)/attention/dot_general", mm=True)) == \
        "attention (incl. page gathers)"
    assert ps.device_part("jit_forward_logits", "x", info("jit(f)/kv_write/scatter")) == "KV cache write"
    assert ps.device_part("jit_forward_logits", "x", info("jit(f)/lm_head/dot_general", mm=True)) == "LM head"
    assert ps.device_part("jit_forward_logits", "x", info("jit(f)/qkv_proj/mul")) == \
        "q/k/v projection (+ norm, rope)"
    assert ps.device_part("jit_forward_logits", "dynamic-slice.3", info("jit(f)/while/body/x", "fusion")) == \
        "layer weight slicing"
    assert ps.device_part("jit_forward_logits", "x", info("jit(f)/mul")) == "other device ops"
    unnamed = info("", "dot", mm=True)
    assert ps.device_part("jit_decoder_layer", "dot.3", unnamed) == "matmuls XLA left unnamed"


def _x(name, start, dur, tid=1, **args):
    return dict(ph="X", name=name, ts=start, dur=dur, tid=tid, pid=1, args=args)


def test_nested_ops_count_once_and_host_spans_are_kept():
    raw = [
        _x("while.1", 0, 100, hlo_op="while.1", hlo_module="m"),
        _x("fusion.2", 10, 20, hlo_op="fusion.2", hlo_module="m"),
        _x("fusion.3", 40, 20, hlo_op="fusion.3", hlo_module="m"),
        _x("end: fusion.3", 60, 1, hlo_op="fusion.3"),
        _x(spans.SCHEDULE, 0, 5, tid=2),
        _x("unrelated", 0, 5, tid=2),
    ]
    ops, host = ps.split_events(raw)
    assert {op.name: op.exclusive for op in ops} == {"while.1": 60, "fusion.2": 20, "fusion.3": 20}
    assert [e.name for e in host] == [spans.SCHEDULE]


def test_breakdown_per_step_from_schedule_to_schedule():
    # two steps of 100 us: each 10 us of scheduling, then 80 us of one matmul op, then 10 us idle
    hlo = {"m": {"dot.1": ps.OpInfo("jit(f)/mlp/dot_general", "dot", True)}}
    raw = []
    for t in (0, 100, 200):
        raw.append(_x(spans.SCHEDULE, t, 10, tid=2))
    for t in (0, 100):
        raw.append(_x("dot.1", t + 10, 80, hlo_op="dot.1", hlo_module="m"))
        raw.append(_x(spans.APPLY, t + 90, 4, tid=2))
    ops, host = ps.split_events(raw)
    result = ps.breakdown(ops, host, hlo, num_steps=2)
    assert result["num_steps"] == 2
    assert result["step_ms"] == pytest.approx(0.1)
    assert result["device"]["MLP (+ norm, activation)"] == pytest.approx(0.08)
    assert result["device_busy_ms"] == pytest.approx(0.08) and result["dot_ops_ms"] == pytest.approx(0.08)
    assert result["host_idle"]["schedule (event loop)"] == pytest.approx(0.01)
    assert result["host_idle"]["apply + emit (event loop)"] == pytest.approx(0.004)
    assert result["host_idle"]["other host time"] == pytest.approx(0.006)
    lines = ps.report_lines("decode, batch 2", dict(result, shapes=["2x (decode 2, prefill 0x0)"]))
    assert lines[0].startswith("decode, batch 2: 0.10 ms per step over 2 steps")


@pytest.mark.timeout(300)  # compiles every step shape of a tiny model, then traces it
def test_a_real_trace_of_a_tiny_model(tiny_llama, tmp_path, capsys):
    out = tmp_path / "profile.json"
    ps.main(["--model", tiny_llama, "--batches", "2", "--prefill-tokens", "32", "--steps", "3",
             "--max-model-len", "256", "--page-size", "4", "--num-pages", "256", "--max-prefill-seqs", "2",
             "--score-items", "100", "--score-query-tokens", "40", "--score-item-tokens", "16",
             "--keep-trace", str(tmp_path), "--json", str(out),
             "--jax-cache-dir", jax.config.jax_compilation_cache_dir])
    report = json.loads(out.read_text())
    score = "score, 100 items x 16 tokens after a 40-token query"
    assert set(report["scenarios"]) == {"decode, batch 2", "prefill, 32 tokens", score}
    for name, result in report["scenarios"].items():
        assert result["num_steps"] == 3, name
        assert result["step_ms"] > 0
        device = result["device"]
        # every part of the model ran and was named: matmuls by their scope, attention, sampling
        assert device["MLP (+ norm, activation)"] > 0 and device["q/k/v projection (+ norm, rope)"] > 0, name
        assert device["attention (incl. page gathers)"] > 0 and device["LM head"] > 0, name
        if name == score:  # score steps take label logprobs, not the sampler
            assert device["sampling"] < 0.05 * result["step_ms"], name
        else:
            assert device["sampling"] > 0, name
        assert sum(device.values()) == pytest.approx(result["device_busy_ms"], rel=0.2)
        assert result["device_busy_ms"] <= result["step_ms"] * 1.001
    decode = report["scenarios"]["decode, batch 2"]
    assert any("decode 2" in shape for shape in decode["shapes"])
    # 1,600 item tokens in steps of 512: the traced steps are score steps (the query was cached before)
    assert all("prefill 1x" in shape for shape in report["scenarios"][score]["shapes"])
    assert "ms per step" in capsys.readouterr().out
