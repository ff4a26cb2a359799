"""Tensor parallelism on the CPU as 4 virtual devices: the tiny Llama, Qwen2 and Qwen3 at TP 1, 2 and 4
give the same logits (prefill, decode, packed scoring) and greedy tokens; every weight and KV buffer
carries the sharding its table declares, also after a restart in place; the compiled decode step holds
only the collectives the layout implies. The devices exist only in a subprocess (tests/engine/tp_worker.py):
XLA_FLAGS is read once per process and must not reach this one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvloom.engine import sharding
from kvloom.engine.config import ConfigError, ModelConfig

pytestmark = pytest.mark.timeout(900)

DEGREES = (1, 2, 4)


def expected_collectives(layers_per_call: int) -> dict:
    """In the executables of a decode step at TP > 1: one all-reduce after the o projection and one after
    down for each layer of the layer group executable (every group runs it), one for the embedding lookup
    split over the vocabulary. Logits stay split over the vocabulary (the sampler reduces them); an
    all-gather anywhere means weights or activations went whole."""
    return {"all-reduce": 2 * layers_per_call + 1}


def run_worker(checkpoint: str, out_dir, degrees=DEGREES) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.engine.tp_worker", checkpoint, str(out_dir),
                           *map(str, degrees)], env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for tp in degrees:
        with open(out_dir / f"tp{tp}.json") as f:
            report = json.load(f)
        with np.load(out_dir / f"tp{tp}.npz") as arrays:
            report["arrays"] = dict(arrays)
        results[tp] = report
    return results


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_same_logits_tokens_and_declared_shardings_at_every_degree(tiny_checkpoints, tmp_path, family):
    results = run_worker(tiny_checkpoints(family), tmp_path)
    reference = results[1]
    for tp, report in results.items():
        assert set(report["arrays"]) == {"prefill", "decode0", "decode1", "decode2", "scores"}
        for name, logits in report["arrays"].items():
            np.testing.assert_allclose(logits, reference["arrays"][name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"TP {tp}, {name}")
        assert report["tokens"] == reference["tokens"], f"TP {tp}"
        assert [len(t) for t in report["tokens"]] == [8, 8, 8]
        assert report["mismatches"] == [], f"TP {tp}"
        assert report["mismatches_after_restart"] == [], f"TP {tp}"
        assert report["layers_per_call"] == 2  # the tiny model's two layers, in one call
        assert report["collectives"] == (expected_collectives(2) if tp > 1 else {}), f"TP {tp}"
        status = report["status"]
        assert status["tensor_parallel_size"] == tp and len(status["devices"]) == tp
        assert status["num_processes"] == 1 and status["kv_pages_per_device"] == 512
        # 2 KV heads: split over 2 devices, one copy each over 4 (replicated in pairs)
        assert status["kv_heads_per_device"] == {1: 2, 2: 1, 4: 1}[tp]


def _model(num_heads, num_kv_heads):
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64, intermediate_size=96,
                       num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8)


def test_degrees_that_do_not_divide_the_heads_fail_clearly():
    assert sharding.kv_head_replicas(_model(4, 2), 2) == 1
    assert sharding.kv_head_replicas(_model(4, 2), 4) == 2
    assert sharding.kv_head_replicas(_model(9, 3), 3) == 1
    with pytest.raises(ConfigError, match="3 does not divide the model's 4 attention heads"):
        sharding.kv_head_replicas(_model(4, 2), 3)
    with pytest.raises(ConfigError, match="6 neither divides nor is a multiple of the model's 4 KV heads"):
        sharding.kv_head_replicas(_model(12, 4), 6)


def test_more_devices_than_exist_fail_clearly():
    import jax

    n = len(jax.devices())
    with pytest.raises(ConfigError, match=f"{n + 1} devices asked for, but only {n} exist"):
        sharding.make_mesh(n + 1)
