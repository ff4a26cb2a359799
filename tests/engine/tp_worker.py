"""Runs one tiny checkpoint at several tensor-parallel degrees, in a process of its own.

`python -m tests.engine.tp_worker CHECKPOINT OUT_DIR TP [TP ...]`, started by
test_tensor_parallel.py with `XLA_FLAGS=--xla_force_host_platform_device_count=4` in its
environment only (the flag is fixed at JAX's first use, so it must never reach the test process).
For each degree it writes OUT_DIR/tp{N}.npz (prefill and decode logits of a static batch, label
logprobs of packed scoring) and OUT_DIR/tp{N}.json (greedy tokens through the engine, every
sharding that differs from its table, before and after a restart in place, the collectives of
the compiled decode step, /status's mesh). The test compares; this file only measures.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections import Counter

import jax
import numpy as np

from kvloom.engine import sharding
from kvloom.engine.buckets import StepShape
from kvloom.engine.config import ParallelConfig
from kvloom.engine.engine import Engine
from kvloom.engine.models import llama
from kvloom.engine.models.loader import load_model
from kvloom.engine.offline import StaticBatch
from kvloom.engine.request import SamplingParams
from tests.conftest import pytest_configure, tiny_engine_config

COLLECTIVE = re.compile(
    r"= [^=]*? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(3, 384, n).tolist() for n in (9, 37, 5)]  # 37: longer than one 32-token chunk
DECODE_STEPS = 3
SCORE_QUERY = RNG.integers(3, 384, 11).tolist()
SCORE_ITEMS = [RNG.integers(3, 384, n).tolist() for n in (3, 6, 1, 4)]
SCORE_LABELS = [5, 17, 200]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops of a compiled HLO module, by kind."""
    return dict(Counter(COLLECTIVE.findall(hlo_text)))


def sharding_mismatches(cfg, params, kv) -> list[str]:
    """Every leaf whose `.sharding` is not what the model's tables declare (empty when all agree)."""
    tp = kv[0].sharding.mesh.size
    declared = llama.param_sharding(params, cfg, tp)
    bad = []
    specs = jax.tree.leaves(declared, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params), specs, strict=True):
        want = jax.sharding.NamedSharding(leaf.sharding.mesh, spec)
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim) or leaf.sharding.mesh.size != tp:
            bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec} (declared {spec})")
    for name, buf in zip(("k", "v"), kv):
        want = jax.sharding.NamedSharding(buf.sharding.mesh, llama.KV_CACHE_SHARDING)
        if not buf.sharding.is_equivalent_to(want, buf.ndim) or buf.sharding.mesh.size != tp:
            bad.append(f"kv {name}: {buf.sharding.spec}")
    return bad


def static_logits(cfg, params, mesh) -> dict[str, np.ndarray]:
    batch = StaticBatch(cfg, params, num_seqs=len(PROMPTS), max_len=64, page_size=4, mesh=mesh)
    out = {"prefill": batch.extend(PROMPTS)}
    tokens = out["prefill"][np.cumsum([len(p) for p in PROMPTS]) - 1].argmax(-1)
    for i in range(DECODE_STEPS):
        out[f"decode{i}"] = batch.extend([[int(t)] for t in tokens])
        tokens = out[f"decode{i}"].argmax(-1)
    return out


async def through_engine(path: str, tp: int) -> tuple[dict, np.ndarray]:
    config = tiny_engine_config(path, warmup=False, parallel=ParallelConfig(tensor_parallel_size=tp))
    async with Engine(config) as engine:
        report = {"tokens": []}
        for prompt in PROMPTS:
            ids = []
            async for out in engine.generate(prompt, GREEDY):
                ids += out.token_ids
            report["tokens"].append(ids)
        scores = await engine.score(SCORE_QUERY, SCORE_ITEMS, SCORE_LABELS, mode="packed")
        runner = engine.runner
        # the pieces of a decode step (embed, the one layer group executable, finish), not the sampler
        hlo = "\n".join(text for text in runner.compiled_hlo(StepShape(1, 0, 0))
                         if not text.startswith("HloModule jit_sample"))
        report["collectives"] = collectives(hlo)
        report["layers_per_call"] = runner.layers_per_call
        report["mismatches"] = sharding_mismatches(runner.model_config, runner.params, runner.kv)
        await engine.restart()
        runner = engine.runner
        report["mismatches_after_restart"] = sharding_mismatches(
            runner.model_config, runner.params, runner.kv)
        report["status"] = engine.status()["parallel"]
        return report, np.asarray(scores.scores)


def main(path: str, out_dir: str, degrees: list[int]) -> None:
    _, cfg, params = load_model(path)
    for tp in degrees:
        mesh = sharding.make_mesh(tp)
        logits = static_logits(cfg, llama.shard_params(params, cfg, mesh), mesh)
        report, scores = asyncio.run(through_engine(path, tp))
        np.savez(os.path.join(out_dir, f"tp{tp}.npz"), scores=scores, **logits)
        with open(os.path.join(out_dir, f"tp{tp}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    pytest_configure(None)  # the test suite's persistent compilation cache
    main(sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]])
