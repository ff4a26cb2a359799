"""The Llama family in JAX: Llama, SmolLM, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

A functional forward over a params pytree whose layers are a tuple of per-layer
weight dicts, unrolled in the trace (each layer's matmuls read their own arrays;
a `lax.scan` over stacked weights copied every layer out of the stack each
step, doubling a CPU decode step; compile time grows with depth). The KV
cache is a pair of arrays `[num_layers, num_pages * page_size, KVH, D]` that
goes into the step and comes back out (the runner donates it). With tensor
parallelism the params and the cache carry the shardings of the tables below
(`shard_params`, `sharded_kv_cache`) and the same forward runs on every device.

A step is a flat run of T tokens (matmuls see them as one [T, D] matrix) made
of attention segments laid end to end: a segment is B sequences with Q query
tokens each (Q = 1 for decode rows, the chunk bucket for prefill rows), each
row with its page table and KV length. Padding tokens write their KV to page 0,
which the allocator never hands out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvloom.engine import sharding
from kvloom.engine.config import ModelConfig
from kvloom.engine.sharding import TP_AXIS
from kvloom.kernels.attention import prefix_extend_attention
from kvloom.kernels.kv_format import storage_dtype, to_storage

# HF parameter names -> params key; per layer and global. Matrices keep HF's [out, in] layout (see `linear`).
LAYER_WEIGHTS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
QKV_BIAS_WEIGHTS = {
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
}
QK_NORM_WEIGHTS = {
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
}
GLOBAL_WEIGHTS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}


def layer_weight_names(cfg: ModelConfig) -> dict[str, str]:
    """The per-layer weights this config needs: HF suffix -> params key."""
    names = dict(LAYER_WEIGHTS)
    if cfg.attention_bias:
        names.update(QKV_BIAS_WEIGHTS)
    if cfg.qk_norm:
        names.update(QK_NORM_WEIGHTS)
    return names


def global_weight_names(cfg: ModelConfig) -> dict[str, str]:
    names = dict(GLOBAL_WEIGHTS)
    if cfg.tie_word_embeddings:
        del names["lm_head.weight"]
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each params leaf as loaded (HF's: [out, in] matrices; per-layer leaves unstacked)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {
        "attn_norm": (d,), "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "mlp_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f),
        "bq": (q,), "bk": (kv,), "bv": (kv,), "q_norm": (hd,), "k_norm": (hd,),
        "embed": (cfg.vocab_size, d), "final_norm": (d,), "lm_head": (cfg.vocab_size, d),
    }
    return shapes


# How each params leaf (as fuse_params lays it out) is split over the tensor-parallel mesh axis TP_AXIS.
# q/k/v and gate/up are column-parallel (split by KV-head group and by the intermediate axis), o and down
# row-parallel, the embedding and the LM head split over the vocabulary; norms are replicated. The KV
# cache is split over its KV heads.
LAYER_SHARDING = {
    "attn_norm": P(), "mlp_norm": P(), "q_norm": P(), "k_norm": P(),
    "wqkv": P(TP_AXIS, None, None),  # [KVH, (G + 2) * hd, D]
    "bqkv": P(TP_AXIS, None),  # [KVH, (G + 2) * hd]
    "wo": P(None, TP_AXIS),  # [D, H * hd]
    "w_gate_up": P(TP_AXIS, None, None),  # [F, 2, D]
    "w_down": P(None, TP_AXIS),  # [D, F]
}
GLOBAL_SHARDING = {
    "embed": P(TP_AXIS, None),  # [V, D]
    "final_norm": P(),
    "lm_head": P(TP_AXIS, None),  # [V, D]
}
KV_CACHE_SHARDING = P(None, None, TP_AXIS, None)  # [L, slots, KVH, hd]
LOGITS_SHARDING = P(None, TP_AXIS)  # [S, V]


def param_sharding(params, cfg: ModelConfig, tp: int):
    """The PartitionSpec of every leaf of `params` (a pytree of the same structure). A vocabulary that
    `tp` does not divide keeps the embedding and LM head whole on every device."""
    split_vocab = cfg.vocab_size % tp == 0
    specs = {k: (spec if split_vocab else P()) for k, spec in GLOBAL_SHARDING.items()}
    return dict({k: specs[k] for k in params if k != "layers"},
                layers=tuple({k: LAYER_SHARDING[k] for k in layer} for layer in params["layers"]))


def logits_sharding(cfg: ModelConfig, tp: int):
    return LOGITS_SHARDING if cfg.vocab_size % tp == 0 else P()


def fuse_params(params, cfg: ModelConfig):
    """From the loaded layout (one leaf per HF tensor) to the layout the forward runs: q, k, v fused
    into one projection grouped by KV head ([KVH, (G + 2) * hd, D]: each KV head's G query heads, then
    its key, then its value), gate and up into another ([F, 2, D]: each intermediate unit's gate and
    up rows), so fewer, larger matmuls whose head and intermediate axes split over devices without
    moving data (the first axis of each: see `linear`). A model with tied embeddings has no "lm_head":
    its embedding ([V, D]) is the LM head's weight as it is."""
    kvh, g, hd = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim

    def grouped(q, k, v):  # [H * hd, ...], [KVH * hd, ...] x2 -> [KVH, (G + 2) * hd, ...]
        rest = q.shape[1:]
        q = q.reshape(kvh, g * hd, *rest)
        return jnp.concatenate([q, k.reshape(kvh, hd, *rest), v.reshape(kvh, hd, *rest)], axis=1)

    def fuse_layer(layer):
        layer = dict(layer)
        layer["wqkv"] = grouped(layer.pop("wq"), layer.pop("wk"), layer.pop("wv"))
        if cfg.attention_bias:
            layer["bqkv"] = grouped(layer.pop("bq"), layer.pop("bk"), layer.pop("bv"))
        layer["w_gate_up"] = jnp.stack([layer.pop("w_gate"), layer.pop("w_up")], axis=1)
        return layer

    return dict(params, layers=tuple(fuse_layer(layer) for layer in params["layers"]))


def replicate_kv_heads(params, cfg: ModelConfig, replicas: int):
    """Copy each KV head `replicas` times in the fused q/k/v projection, each copy serving G / replicas
    of its query heads: the same model with replicas * KVH KV heads (how KV heads split over more
    devices than there are of them). The forward reads the KV head count from the weights."""
    if replicas == 1:
        return params
    kvh, g, hd = cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim

    def split(w):  # [KVH, (G + 2) * hd, ...] -> [KVH * r, (G / r + 2) * hd, ...]
        rest = w.shape[2:]
        w = w.reshape(kvh, g + 2, hd, *rest)
        q = w[:, :g].reshape(kvh, replicas, g // replicas, hd, *rest)
        kv = jnp.broadcast_to(w[:, None, g:], (kvh, replicas, 2, hd, *rest))
        return jnp.concatenate([q, kv], axis=2).reshape(kvh * replicas, (g // replicas + 2) * hd, *rest)

    def split_layer(layer):
        layer = dict(layer, wqkv=split(layer["wqkv"]))
        if "bqkv" in layer:
            layer["bqkv"] = split(layer["bqkv"])
        return layer

    return dict(params, layers=tuple(split_layer(layer) for layer in params["layers"]))


def num_kv_heads_of(params) -> int:
    """KV heads of the model as fused (more than the config's when replicated)."""
    return params["layers"][0]["wqkv"].shape[0]


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """Fused params -> the same model on `mesh`: KV heads replicated as the mesh needs, every leaf
    placed with the sharding its table declares. Raises ConfigError when the heads do not divide."""
    tp = mesh.size
    params = replicate_kv_heads(params, cfg, sharding.kv_head_replicas(cfg, tp))
    return sharding.place_tree(params, sharding.named(mesh, param_sharding(params, cfg, tp)))


def kv_cache_struct(cfg: ModelConfig, params, num_pages: int, page_size: int, mesh: Mesh,
                    dtype=None) -> jax.ShapeDtypeStruct:
    """The shape, dtype (default: the weights') and sharding of each of the K and V caches for sharded
    `params`, in the storage dtype of kernels.kv_format. The forward stores keys and values in the cache's
    dtype and attends in float32."""
    shape = kv_cache_shape(cfg, num_pages, page_size, num_kv_heads_of(params))
    return jax.ShapeDtypeStruct(shape, storage_dtype(dtype or params["embed"].dtype),
                                sharding=NamedSharding(mesh, KV_CACHE_SHARDING))


def sharded_kv_cache(cfg: ModelConfig, params, num_pages: int, page_size: int, mesh: Mesh, dtype=None):
    """A zero KV cache for sharded `params`, split over its KV heads (dtype: as kv_cache_struct)."""
    spec = kv_cache_struct(cfg, params, num_pages, page_size, mesh, dtype)
    return sharding.zeros(spec.shape, spec.dtype, spec.sharding), sharding.zeros(spec.shape, spec.dtype,
                                                                                 spec.sharding)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Segment:
    """B sequences with `num_query_tokens` query tokens each, consecutive in the flat token run."""

    page_table: jax.Array  # [B, P] int32
    past_lens: jax.Array  # [B] int32, tokens already in the cache
    new_lens: jax.Array  # [B] int32, real tokens of this step (<= num_query_tokens)
    num_query_tokens: int = field(metadata=dict(static=True))
    segment_ids: Optional[jax.Array] = None  # [B, Q] int32: packed independent extensions (scoring)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInput:
    """One forward step, as arrays. Token count T = sum of B * Q over segments."""

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, KV slot each token writes (page * page_size + offset)
    logits_indices: jax.Array  # [S] int32, tokens whose logits come back
    segments: tuple[Segment, ...]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [D/2], with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs.kind == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, cos, sin):
    # x: [T, N, D]; cos, sin: [T, 1, D/2]; rotate-half convention (HF layout)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int, num_kv_heads: Optional[int] = None):
    return (cfg.num_layers, num_pages * page_size, num_kv_heads or cfg.num_kv_heads, cfg.head_dim)


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> tuple[jax.Array, jax.Array]:
    shape, storage = kv_cache_shape(cfg, num_pages, page_size), storage_dtype(dtype)
    return jnp.zeros(shape, storage), jnp.zeros(shape, storage)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype, num_kv_heads: Optional[int] = None) -> int:
    return 2 * cfg.num_layers * (num_kv_heads or cfg.num_kv_heads) * cfg.head_dim * jnp.dtype(dtype).itemsize


# Up to this many rows, `linear` computes W x^T and transposes the result.
TRANSPOSED_DOT_MAX_ROWS = 32


def linear(x, w, kernel=None):
    """x [T, K] (float32) times the weight w [*out, K] (HF's [out, in] layout, output axes first) -> float32
    [T, *out].

    `kernel` (kernels.cpu_kernels.CpuKernels, or None) computes the products it `handles` (a decode
    step's rows on a CPU) natively; the rest run on XLA's dot as follows.

    A decode step's few rows (T <= TRANSPOSED_DOT_MAX_ROWS) run as W x^T, the weight's output axis as the
    product's long side, then a transpose of the small result: XLA's CPU dot runs [N, K] x [K, T] 15-25%
    faster than [T, K] x [K, N] at T = 8..32 (the decoder's and the LM head's shapes of the default model);
    the optimization barrier keeps XLA from folding the transpose back into the slower form. Longer steps
    (prefills) run as x W^T, which is as fast there as a weight stored [in, out]. The output axes merge
    into one, so a weight split over devices is split on its first axis (a split further in would make
    the merged axis interleave the devices' parts: XLA gathers the weight whole).

    Lower-precision weights multiply x rounded to their dtype, accumulating in float32: XLA's CPU dot
    runs bfloat16 x bfloat16 -> float32 natively (twice float32's rate where the CPU has bfloat16 dot
    instructions), where a bfloat16 result, or a single row, takes a path ~5x slower: a single row is
    doubled. float16 weights on a CPU are widened to float32 instead (XLA's CPU dot converts float16 to
    float32 itself, at the same speed), so x keeps float32, as in the CPU kernel."""
    rows = x.shape[0]
    w2 = w.reshape(-1, w.shape[-1])  # [N, K]: free, and what keeps XLA from copying w into another layout
    if kernel is not None and kernel.handles(rows, w2.dtype):
        return kernel.linear(x, w2).reshape(rows, *w.shape[:-1])
    if w2.dtype == jnp.float16 and jax.default_backend() == "cpu":
        w2 = w2.astype(jnp.float32)  # XLA's CPU dot widens float16 anyway (measured as fast): x stays float32
    if w2.dtype != x.dtype:
        x = x.astype(w2.dtype)
        if rows == 1:
            x = jnp.concatenate([x, x])
    if rows <= TRANSPOSED_DOT_MAX_ROWS:
        y = jax.lax.optimization_barrier(jnp.einsum("nk,tk->nt", w2, x, preferred_element_type=jnp.float32)).T
    else:
        y = jnp.einsum("tk,nk->tn", x, w2, preferred_element_type=jnp.float32)
    return y[:rows].reshape(rows, *w.shape[:-1])


def embed(params, token_ids):
    """The step's token embeddings [T, D], in float32: the residual stream stays float32 whatever the
    weights' dtype (`linear` rounds each matmul's input to the weights' dtype)."""
    return params["embed"][token_ids].astype(jnp.float32)


def decoder_layer(lp, h, kv_cache, layer, step: StepInput, *, cfg: ModelConfig, page_size: int, kernel=None):
    """One decoder layer over the step: (h [T, D] after the layer, its new keys and values [T, KVH, D]).
    `lp` is the layer's own weights; `layer` (an int32 scalar, traced) picks its slice of the KV cache,
    read only (the new keys are written after the last layer, by `write_kv_cache`). `kernel`: `linear`'s and
    the attention's (kernels.cpu_kernels), or None."""
    num_tokens = h.shape[0]
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles = step.positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    scale = cfg.head_dim ** -0.5
    hd, nh, nkv = cfg.head_dim, cfg.num_heads, lp["wqkv"].shape[0]
    g = nh // nkv
    eps = cfg.rms_norm_eps
    k_all, v_all = kv_cache
    k_pages = k_all.reshape(k_all.shape[0], -1, page_size, nkv, hd)  # [L, num_pages, page_size, KVH, D]
    v_pages = v_all.reshape(v_all.shape[0], -1, page_size, nkv, hd)

    with jax.named_scope("qkv_proj"):
        x = rms_norm(h, lp["attn_norm"], eps)
        qkv = linear(x, lp["wqkv"], kernel)  # [T, KVH, (G + 2) * D]
        if cfg.attention_bias:
            qkv = qkv + lp["bqkv"]
        q, k, v = jnp.split(qkv, [g * hd, (g + 1) * hd], axis=-1)
        q = q.reshape(num_tokens, nh, hd)  # q: [T, H, D], head h reads KV head h // G
        # k, v: [T, KVH, D]
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], eps)
            k = rms_norm(k, lp["k_norm"], eps)
        q = apply_rope(q, cos, sin)
        k = to_storage(apply_rope(k, cos, sin), k_all.dtype)
        v = to_storage(v, v_all.dtype)
    outs, offset = [], 0
    for seg in step.segments:
        rows, qn = seg.page_table.shape[0], seg.num_query_tokens
        n = rows * qn
        o = prefix_extend_attention(
            q[offset:offset + n].reshape(rows, qn, nh, hd),
            k[offset:offset + n].reshape(rows, qn, nkv, hd),
            v[offset:offset + n].reshape(rows, qn, nkv, hd),
            seg.new_lens, k_pages, v_pages, seg.page_table, seg.past_lens, scale=scale, layer=layer,
            segment_ids=seg.segment_ids, kernel=kernel)
        outs.append(o.reshape(n, nh * hd))
        offset += n
    attn = jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]  # [T, H*D]
    with jax.named_scope("o_proj"):
        h = h + linear(attn, lp["wo"], kernel)
    with jax.named_scope("mlp"):
        x = rms_norm(h, lp["mlp_norm"], eps)
        gate_up = linear(x, lp["w_gate_up"], kernel)  # [T, F, 2]
        gate, up = gate_up[..., 0], gate_up[..., 1]
        h = h + linear(jax.nn.silu(gate) * up, lp["w_down"], kernel)
    return h, k, v


def write_kv_cache(kv_cache, new_keys, new_values, slot_mapping):
    """Every layer's new keys and values (sequences of [T, KVH, D]) into the cache, at the step's slots.
    The cache is written as rows of one [L * slots, KVH * D] view, the layers' tokens one after another:
    XLA's CPU scatter writes whole rows several times faster than windows across the layer axis of the
    stacked updates (and needs no transposed copy of them)."""
    num_layers, num_slots = kv_cache[0].shape[:2]
    rows = (jnp.arange(num_layers, dtype=jnp.int32)[:, None] * num_slots + slot_mapping[None, :]).reshape(-1)

    def write(cache, new):
        flat = cache.reshape(num_layers * num_slots, -1)
        updates = jnp.concatenate([x.reshape(x.shape[0], -1) for x in new])  # [L * T, KVH * D]
        return flat.at[rows].set(updates.astype(flat.dtype), mode="promise_in_bounds").reshape(cache.shape)

    with jax.named_scope("kv_write"):
        return write(kv_cache[0], new_keys), write(kv_cache[1], new_values)


def decoder_layers(layer_params, h, kv_cache, first_layer, step: StepInput, *, cfg: ModelConfig,
                   page_size: int, kernel=None):
    """Decoder layers first_layer, first_layer + 1, ... (`layer_params`: their weights, in order): h after
    the last, and each layer's new keys and values (tuples)."""
    keys, values = [], []
    for i, lp in enumerate(layer_params):
        h, k, v = decoder_layer(lp, h, kv_cache, first_layer + i, step, cfg=cfg, page_size=page_size,
                                kernel=kernel)
        keys.append(k)
        values.append(v)
    return h, tuple(keys), tuple(values)


def forward(params, kv_cache, step: StepInput, *, cfg: ModelConfig, page_size: int):
    """The whole model over one step, as one function: (final-normed hidden states of every token [T, D],
    new kv_cache). The engine runs the same pieces compiled apart (`engine.forward.LayeredForward`);
    this composition is their definition, and what tests compare them with."""
    h = embed(params, step.token_ids)
    h, keys, values = decoder_layers(params["layers"], h, kv_cache, 0, step, cfg=cfg, page_size=page_size)
    return final_norm(params, h, cfg=cfg), write_kv_cache(kv_cache, keys, values, step.slot_mapping)


def final_norm(params, h, *, cfg: ModelConfig):
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps)


def logits_from_hidden(params, h, *, cfg: ModelConfig, kernel=None):
    """Project final hidden states [S, D] to float32 logits [S, V] (params as fused by fuse_params)."""
    with jax.named_scope("lm_head"):
        return linear(h, params.get("lm_head", params["embed"]), kernel).astype(jnp.float32)
