"""A decode step's matmuls alone: one pass over a model's weights (its layers' four products and the LM
head), with the CPU kernel (kernels/cpu_kernels) and with XLA's dot, at a few row counts and dtypes.

    .venv/bin/python -m kvloom.tools.bench_linear [--rows 1,8,32] [--dtypes float32,float16,bfloat16]
        [--layers 30 --hidden 576 --intermediate 1536 --qkv 960 --vocab 49152] [--repeats 20]

The shapes default to the default model's (SmolLM2-135M). Random weights, one jitted program per (dtype,
rows, path) that runs every product through `llama.linear`, each layer's input the previous product's
output (so nothing is skipped); the best of three timings of --repeats passes. Prints ms per pass and the
weight bytes read per second. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvloom.engine.config import cache_root
from kvloom.engine.models import llama
from kvloom.kernels import cpu_kernels
from kvloom.tools.report import format_table, log


def weights(args, dtype, rng) -> dict:
    def random(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02, dtype)
    layers = [dict(qkv=random(args.qkv, args.hidden), o=random(args.hidden, args.hidden),
                   gate_up=random(2 * args.intermediate, args.hidden),
                   down=random(args.hidden, args.intermediate)) for _ in range(args.layers)]
    return dict(layers=layers, head=random(args.vocab, args.hidden))


def one_pass(kernel, hidden: int, intermediate: int):
    def run(params, x):
        for lp in params["layers"]:
            a = llama.linear(x, lp["qkv"], kernel)[:, :hidden]
            x = x + llama.linear(a, lp["o"], kernel)
            g = llama.linear(x, lp["gate_up"], kernel)
            x = x + llama.linear(jax.nn.silu(g[:, :intermediate]) * g[:, intermediate:], lp["down"], kernel)
        return llama.linear(x, params["head"], kernel)
    return jax.jit(run)


def time_pass(fn, params, x, repeats: int) -> float:
    fn(params, x).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            y = fn(params, x)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    for name, default in (("layers", 30), ("hidden", 576), ("intermediate", 1536), ("qkv", 960),
                          ("vocab", 49152), ("repeats", 20)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    kernel = cpu_kernels.load(f"{cache_root()}/kernels")
    if kernel is None:
        log("bench_linear", f"no CPU kernel here ({cpu_kernels.unavailable_reason() or 'its build failed'}): "
                            "XLA's dot only")
    rng = np.random.default_rng(0)
    rows_out = []
    for dtype in args.dtypes.split(","):
        params = weights(args, jnp.dtype(dtype), rng)
        nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
        for rows in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((rows, args.hidden), np.float32) * 0.1)
            row = [dtype, str(rows)]
            for path in (None, kernel) if kernel is not None else (None,):
                if path is not None and not path.handles(rows, dtype):
                    row += ["-", "-"]
                    continue
                s = time_pass(one_pass(path, args.hidden, args.intermediate), params, x, args.repeats)
                row += [f"{s * 1e3:.2f}", f"{nbytes / s / 1e9:.1f}"]
            rows_out.append(row)
            log("bench_linear", " ".join(row))
    header = ["dtype", "rows", "XLA ms", "XLA GB/s"] + (["kernel ms", "kernel GB/s"] if kernel else [])
    print("\n".join(format_table([header, *rows_out], num_left=1)))
    return rows_out


if __name__ == "__main__":
    main()
