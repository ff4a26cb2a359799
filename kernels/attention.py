"""Paged "prefix + extend" attention.

A step extends each of B sequences by up to Q new tokens. Their queries attend
to the sequence's past, read from the paged KV cache, and to the step's own new
keys (causally); the new keys are written to the cache after the whole forward,
so inside the layer loop the cache is read-only (reading and writing one big
buffer in the same loop makes XLA copy it).

Shapes (one step):
    q:                [B, Q, H, D]   queries of the new tokens
    k_new, v_new:     [B, Q, KVH, D] keys and values of the new tokens
    new_lens:         [B] int32      real new tokens per row (the rest is padding)
    k_cache, v_cache: [L, num_pages, page_size, KVH, D], read at layer `layer`
                      (or [num_pages, page_size, KVH, D] with layer=None), in a storage
                      dtype of kernels.kv_format (k_new and v_new too, or any float)
    page_table:       [B, P] int32   page ids of each sequence, in position order
    past_lens:        [B] int32      tokens already in the cache before this step

New token i of a row sees every past token and new tokens 0..i. With
`segment_ids` ([B, Q] int32) a row packs several independent extensions of the
same past (multi-item scoring): token i then sees new token j only when j <= i
and both carry the same segment id. A padding row (new_lens 0) returns zeros.
Grouped-query attention: head h reads kv head h // (H // KVH).

`prefix_extend_attention_reference` is the pure-jnp definition: it gathers the
whole page table. `prefix_extend_attention` is what the model runs: it walks
the past in blocks of pages with an online softmax and stops after the longest
past, so its cost follows the real context, not the table's width, and skips the
new keys after each block of query rows; a decode step
(one new token per row) takes `_decode_attention`, the same walk with scores read
from the gathered pages' own layout. On a CPU with AVX-512 the runner passes
`kernel` (kernels.cpu_kernels), and both kinds of step run as native kernels
instead (cpu_attention.cc, cpu_extend_attention.cc). The tests compare each
with the reference over dtypes, page sizes and lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvloom.kernels.kv_format import to_float32

_NEG_INF = -1e30
NEW_KEY_BLOCK = 128  # query rows per block of a step's attention among its own new tokens


def _group(x, num_kv_heads):
    b, n, h, d = x.shape
    return x.reshape(b, n, num_kv_heads, h // num_kv_heads, d)  # [B, Q, KVH, G, D]


def _gather_pages(cache, table, layer):
    # One gather straight from the whole cache: slicing a layer out first would copy it.
    return cache[table] if layer is None else cache[layer, table]  # [B, n, ps, KVH, D]


def _new_mask(new_lens, qn, segment_ids=None):
    i = jnp.arange(qn)
    mask = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < new_lens[:, None, None])  # [B, Q, Q]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def prefix_extend_attention_reference(q, k_new, v_new, new_lens, k_cache, v_cache, page_table, past_lens,
                                      *, scale, layer=None, segment_ids=None):
    """Pure-jnp definition; returns [B, Q, H, D] in q's dtype."""
    b, qn, h, d = q.shape
    page_size, kvh = k_cache.shape[-3], k_cache.shape[-2]
    num_past = page_table.shape[1] * page_size
    k_past = _gather_pages(k_cache, page_table, layer).reshape(b, num_past, kvh, d)
    v_past = _gather_pages(v_cache, page_table, layer).reshape(b, num_past, kvh, d)
    k = jnp.concatenate([to_float32(k_past), to_float32(k_new)], axis=1)  # [B, S + Q, KVH, D]
    v = jnp.concatenate([to_float32(v_past), to_float32(v_new)], axis=1)
    past_mask = jnp.broadcast_to(jnp.arange(num_past)[None, None, :] < past_lens[:, None, None],
                                 (b, qn, num_past))
    mask = jnp.concatenate([past_mask, _new_mask(new_lens, qn, segment_ids)], axis=-1)  # [B, Q, S + Q]
    mask = mask & (jnp.arange(qn)[None, :, None] < new_lens[:, None, None])
    scores = jnp.einsum("bqkgd,bskd->bkgqs", _group(q, kvh).astype(jnp.float32), k) * scale
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jnp.where(mask[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, qn, h, d).astype(q.dtype)


def _block_reader(k_cache, v_cache, page_table, past_lens, layer, block_pages: int):
    """(read_block, num_blocks): read_block(j) -> (keys, values [B, block_pages * page_size, KVH, D] in
    the cache's storage dtype, visible [B, block_pages * page_size]: which of them hold the past) of
    block j of each row's pages; num_blocks: the blocks the longest past needs."""
    b, num_table_pages = page_table.shape
    page_size, kvh, d = k_cache.shape[-3:]
    block_pages = min(block_pages, num_table_pages)
    num_blocks_total = -(-num_table_pages // block_pages)
    pad = num_blocks_total * block_pages - num_table_pages
    if pad:
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    block_kv = block_pages * page_size
    num_blocks = jnp.minimum((jnp.max(past_lens) + block_kv - 1) // block_kv, num_blocks_total)

    def read_block(j):
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * block_pages, block_pages, axis=1)  # [B, bp]
        k = _gather_pages(k_cache, pages, layer).reshape(b, block_kv, kvh, d)
        v = _gather_pages(v_cache, pages, layer).reshape(b, block_kv, kvh, d)
        return k, v, (j * block_kv + jnp.arange(block_kv))[None, :] < past_lens[:, None]

    return read_block, num_blocks


def _online_softmax_step(m, denom, acc, s, visible):
    """Fold one block's scores s (masked by `visible`) into the running max m, sum denom and acc; returns
    (m, denom, acc scaled to the new max, the block's probabilities)."""
    s = jnp.where(visible, s, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    return m_new, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None], p


@jax.named_scope("attention")  # tools.profile_step counts its ops, page gathers included, as attention
def prefix_extend_attention(q, k_new, v_new, new_lens, k_cache, v_cache, page_table, past_lens,
                            *, scale, layer=None, segment_ids=None, block_pages=None,
                            new_key_block=NEW_KEY_BLOCK, kernel=None):
    """Blocked variant with an online softmax; same contract as the reference. `kernel`
    (kernels.cpu_kernels.CpuKernels, or None) takes the attention where it handles it: a decode step's
    (`decode_attention`), any other step's (`extend_attention`; segment ids must label contiguous runs).

    Inside, queries are laid out [B, KVH, Q*G, D] and keys [B, KVH, S, D], so every score and
    value product is one batched matmul over (B, KVH) (XLA on CPU runs the 5-d einsum of the
    reference several times slower); scores are viewed as [B, KVH, Q, G, S] for masking.
    A decode step (one new token per row) takes `_decode_attention`."""
    b, qn, h, d = q.shape
    page_size, kvh = k_cache.shape[-3], k_cache.shape[-2]
    if block_pages is None:  # decode rows gather little per block; prefill rows amortise bigger blocks
        block_pages = max(1, (32 if qn == 1 else 256) // page_size)
    if layer is not None and kernel is not None and kernel.handles_attention(d, h // kvh, k_cache.dtype):
        qs = q.astype(jnp.float32) * scale
        if qn == 1 and segment_ids is None:
            own_k, own_v = to_float32(k_new).reshape(b, kvh, d), to_float32(v_new).reshape(b, kvh, d)
            out = kernel.decode_attention(qs.reshape(b, h, d), own_k, own_v,
                                          new_lens, k_cache, v_cache, page_table, past_lens, layer)
        else:
            segments = jnp.zeros((b, qn), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            out = kernel.extend_attention(qs, to_float32(k_new), to_float32(v_new), new_lens, segments,
                                          k_cache, v_cache, page_table, past_lens, layer)
        return out.reshape(b, qn, h, d).astype(q.dtype)
    if qn == 1 and segment_ids is None:
        return _decode_attention(q, k_new, v_new, new_lens, k_cache, v_cache, page_table, past_lens,
                                 scale=scale, layer=layer, block_pages=block_pages)
    g = h // kvh
    qt = jnp.transpose(_group(q, kvh), (0, 2, 1, 3, 4)).reshape(b, kvh, qn * g, d).astype(jnp.float32) * scale

    def scores(keys, queries=qt):  # keys: [B, S, KVH, D], queries: [B, KVH, n * G, D] -> [B, KVH, n, G, S]
        kt = jnp.transpose(to_float32(keys), (0, 2, 1, 3))
        s = jnp.einsum("bkqd,bksd->bkqs", queries, kt)
        return s.reshape(b, kvh, queries.shape[2] // g, g, keys.shape[1])

    def weighted(p, values):  # p: [B, KVH, n, G, S], values: [B, S, KVH, D] -> [B, KVH, n, G, D]
        vt = jnp.transpose(to_float32(values), (0, 2, 1, 3))
        n = p.shape[2]
        out = jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kvh, n * g, p.shape[-1]), vt)
        return out.reshape(b, kvh, n, g, d)

    # The new tokens first: they seed the running max, sum and accumulator. Causally, a block of
    # `new_key_block` query rows [lo, hi) sees new keys [0, hi) only, so each block skips the keys after
    # it (a 512-token prefill in blocks of 128 computes 5/8 of the full square of scores).
    new_mask = _new_mask(new_lens, qn, segment_ids)[:, None, :, None, :]  # [B, 1, Q, 1, Q]

    def new_block(lo, hi):
        mask = new_mask[:, :, lo:hi, :, :hi]
        s = jnp.where(mask, scores(k_new[:, :hi], qt[:, :, lo * g:hi * g]), _NEG_INF)
        m = jnp.max(s, axis=-1)  # [B, KVH, hi - lo, G]
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        return m, jnp.sum(p, axis=-1), weighted(p, v_new[:, :hi])

    parts = [new_block(lo, min(lo + new_key_block, qn)) for lo in range(0, qn, new_key_block)]
    m, denom, acc = (jnp.concatenate(xs, axis=2) if len(xs) > 1 else xs[0] for xs in zip(*parts))
    read_block, num_blocks = _block_reader(k_cache, v_cache, page_table, past_lens, layer, block_pages)

    def body(state):
        j, m, denom, acc = state
        k, v, visible = read_block(j)
        m, denom, acc, p = _online_softmax_step(m, denom, acc, scores(k), visible[:, None, None, None, :])
        return j + 1, m, denom, acc + weighted(p, v)

    _, _, denom, acc = jax.lax.while_loop(lambda st: st[0] < num_blocks, body, (jnp.int32(0), m, denom, acc))
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [B, KVH, Q, G, D]
    out = jnp.where((jnp.arange(qn)[None, :] < new_lens[:, None])[:, None, :, None, None], out, 0.0)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, qn, h, d).astype(q.dtype)


def _decode_attention(q, k_new, v_new, new_lens, k_cache, v_cache, page_table, past_lens, *, scale, layer,
                      block_pages):
    """One new token per row: scores [B, KVH, G, S] straight from the gathered keys' own layout
    [B, S, KVH, D], with no transposed copy of each block (the general path's transposes cost ~20% of a
    decode step's attention on a CPU: kvloom.tools.profile_step)."""
    b, _, h, d = q.shape
    kvh = k_cache.shape[-2]
    qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32) * scale  # [B, KVH, G, D]
    k_own, v_own = to_float32(k_new).reshape(b, kvh, d), to_float32(v_new).reshape(b, kvh, d)
    m = jnp.einsum("bkgd,bkd->bkg", qg, k_own)  # the row's own token seeds the softmax: weight exp(0) = 1
    denom = jnp.ones_like(m)
    acc = jnp.broadcast_to(v_own[:, :, None, :], qg.shape)
    read_block, num_blocks = _block_reader(k_cache, v_cache, page_table, past_lens, layer, block_pages)

    def body(state):
        j, m, denom, acc = state
        k, v, visible = read_block(j)
        s = jnp.einsum("bkgd,bskd->bkgs", qg, to_float32(k))
        m, denom, acc, p = _online_softmax_step(m, denom, acc, s, visible[:, None, None, :])
        return j + 1, m, denom, acc + jnp.einsum("bkgs,bskd->bkgd", p, to_float32(v))

    _, _, denom, acc = jax.lax.while_loop(lambda st: st[0] < num_blocks, body, (jnp.int32(0), m, denom, acc))
    out = jnp.where((new_lens > 0)[:, None, None, None], acc / denom[..., None], 0.0)
    return out.reshape(b, 1, h, d).astype(q.dtype)
