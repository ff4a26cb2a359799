"""The machine's ceilings, measured in this process, and the roofline bounds they put on a model.

    best_of(fn, repeats)             the fastest of repeated calls, in seconds
    measure_matmul_peak(sizes, ...)  GFLOP/s of a jitted square jnp.dot, float32 or bfloat16 (the compute
                                     ceiling)
    measure_bandwidth(bytes, ...)    copy bandwidth of numpy and of a jitted jnp `x + 1`
    measure_weight_reads(dtype, ...) bytes/s a batch-1 decode reads weights at: the model's one-row
                                     products (llama.linear, with the CPU kernel where the engine uses
                                     it) over more matrices of one dtype than the caches hold
    roofline_tokens_per_s, roofline_items_per_s, Roofline
                                     tokens/s (items/s) bounds of a float32 model under those ceilings

JAX is imported inside the measuring functions only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_matmul_peak(sizes: Sequence[int], repeats: int, dtype: str = "float32") -> dict:
    """Best GFLOP/s of a jitted square product of `dtype` per size, and the best over all sizes. The
    product accumulates in float32 with a float32 result, as the model's matmuls do (engine.models.llama.
    linear): XLA's CPU dot runs a bfloat16 one so at twice float32's rate where the CPU has bfloat16 dot
    instructions, and a bfloat16 result on a path several times slower."""
    import jax
    import jax.numpy as jnp

    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    by_size = {}
    for i, n in enumerate(sizes):
        key_a, key_b = jax.random.split(jax.random.PRNGKey(i))
        a = jax.random.normal(key_a, (n, n), dtype)  # a, b: [n, n]
        b = jax.random.normal(key_b, (n, n), dtype)
        dot(a, b).block_until_ready()  # compile
        seconds = best_of(lambda: dot(a, b).block_until_ready(), repeats)
        by_size[n] = 2 * n ** 3 / seconds / 1e9
    return dict(sizes=list(sizes), repeats=repeats, dtype=dtype,
                gflops_by_size={str(n): g for n, g in by_size.items()}, peak_gflops=max(by_size.values()))


def measure_bandwidth(num_bytes: int, repeats: int) -> dict:
    """Best copy bandwidth (bytes read + written per second) of a numpy copy and of a jitted jnp
    `x + 1` over a float32 buffer of num_bytes; the better of the two is the figure."""
    import jax
    import jax.numpy as jnp

    n = num_bytes // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    np.copyto(dst, src)
    numpy_s = best_of(lambda: np.copyto(dst, src), repeats)
    add_one = jax.jit(lambda x: x + 1.0)
    x = jnp.ones(n, jnp.float32)
    add_one(x).block_until_ready()  # compile
    jax_s = best_of(lambda: add_one(x).block_until_ready(), repeats)
    by_method = {"numpy_copy": 2 * n * 4 / numpy_s, "jax_add": 2 * n * 4 / jax_s}
    return dict(num_bytes=n * 4, repeats=repeats, bytes_per_s_by_method=by_method,
                bytes_per_s=max(by_method.values()))


def measure_weight_reads(dtype: str, num_bytes: int, repeats: int,
                         shape: tuple[int, int] = (3072, 576)) -> dict:
    """Best bytes/s of weights read by the model's product of one row (`llama.linear`: x [1, K] float32,
    w [N, K] of `dtype`, through the CPU kernel where `--cpu-kernels auto` would use it: `path` says
    which) over matrices totalling num_bytes, each read once per pass: a batch-1 decode's matmuls."""
    import jax
    import jax.numpy as jnp

    from kvloom.engine.config import cache_root
    from kvloom.engine.models import llama
    from kvloom.kernels import cpu_kernels

    n, k = shape
    count = max(1, num_bytes // (k * n * jnp.dtype(dtype).itemsize))
    weights = [jax.random.normal(jax.random.PRNGKey(i), (n, k), dtype) for i in range(count)]
    x = jnp.ones((1, k), jnp.float32)
    kernel = cpu_kernels.load(f"{cache_root()}/kernels") if jax.default_backend() == "cpu" else None
    kernel = kernel if kernel is not None and kernel.handles(1, dtype) else None
    matvec = jax.jit(lambda x, w: llama.linear(x, w, kernel))
    matvec(x, weights[0]).block_until_ready()  # compile

    def one_pass():
        out = None
        for w in weights:
            out = matvec(x, w)
        out.block_until_ready()

    seconds = best_of(one_pass, repeats)
    total = count * k * n * jnp.dtype(dtype).itemsize
    return dict(dtype=dtype, shape=list(shape), num_bytes=total, repeats=repeats, bytes_per_s=total / seconds,
                path="cpu kernel" if kernel is not None else "xla")


def roofline_tokens_per_s(peak_flops: float, num_parameters: int) -> float:
    """Tokens/s if every token cost 2 FLOPs per parameter at the matmul peak."""
    return peak_flops / (2 * num_parameters)


def roofline_items_per_s(peak_flops: float, num_parameters: int, query_tokens: int, num_items: int,
                         item_tokens: int) -> float:
    """Scored items/s when the query is computed once, then each item's tokens, every token at 2 FLOPs
    per parameter at the matmul peak."""
    request_tokens = query_tokens + num_items * item_tokens
    return roofline_tokens_per_s(peak_flops, num_parameters) * num_items / request_tokens


@dataclass(frozen=True)
class Roofline:
    """Upper bounds on tokens/s for one float32 model on this machine.

    compute: every token costs 2 FLOPs per parameter at the matmul peak (any figure);
    memory: a decode step reads every weight once, shared by the batch, so batch B decodes at most
    B x bandwidth / (params x 4 bytes) tok/s (KV-cache reads ignored: a bound, not an estimate)."""

    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    num_parameters: int
    bytes_per_parameter: int = 4  # float32

    @property
    def compute_tok_s(self) -> float:
        return roofline_tokens_per_s(self.peak_flops, self.num_parameters)

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.bytes_per_parameter

    @property
    def memory_tok_s(self) -> float:
        """Decode at batch 1."""
        return self.bandwidth / self.weight_bytes

    def decode_tok_s(self, batch: int) -> float:
        return min(self.compute_tok_s, batch * self.memory_tok_s)

    def score_items_s(self, query_tokens: int, num_items: int, item_tokens: int) -> float:
        return roofline_items_per_s(self.peak_flops, self.num_parameters, query_tokens, num_items,
                                    item_tokens)

    def to_json(self) -> dict:
        return dict(peak_gflops=self.peak_flops / 1e9, bandwidth_gb_s=self.bandwidth / 1e9,
                    num_parameters=self.num_parameters, weight_bytes=self.weight_bytes,
                    compute_tok_s=self.compute_tok_s, memory_tok_s_batch1=self.memory_tok_s)
