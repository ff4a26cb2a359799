"""Paged attention over a KV cache laid out in pages.

Layout (one layer):
    k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]
    page_table:       [B, P] int32, page ids of each sequence in position order
    kv_lens:          [B] int32, valid KV tokens of each sequence (this step's tokens included)
    q:                [B, Q, H, D] queries, Q per sequence (Q = 1 for decode)
    q_positions:      [B, Q] int32, absolute position of each query token

A query at position p attends to the keys at positions 0..p that are below its
sequence's kv_len (causal, and padding rows with kv_len 0 see nothing and
return zeros). Grouped-query attention: head h reads kv head h // (H // KVH).

`paged_attention_reference` is the pure-jnp definition: it gathers every page
of the table. `paged_attention` is the variant the model runs: it walks the
pages in blocks with an online softmax and stops after the longest sequence,
so its cost follows the real context lengths, not the table's width. The test
compares the two over dtypes, page sizes and lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def _group(q, num_kv_heads):
    b, qn, h, d = q.shape
    return q.reshape(b, qn, num_kv_heads, h // num_kv_heads, d)  # [B, Q, KVH, G, D]


def paged_attention_reference(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, scale):
    """Pure-jnp paged attention; returns [B, Q, H, D] in q's dtype."""
    b, qn, h, d = q.shape
    _, page_size, kvh, _ = k_pages.shape
    num_kv = page_table.shape[1] * page_size
    k = k_pages[page_table].reshape(b, num_kv, kvh, d)  # [B, S, KVH, D]
    v = v_pages[page_table].reshape(b, num_kv, kvh, d)
    qg = _group(q, kvh).astype(jnp.float32)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)) * scale  # [B, KVH, G, Q, S]
    key_pos = jnp.arange(num_kv)
    mask = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)  # mask: [B, Q, S]
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, qn, h, d).astype(q.dtype)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, scale, block_pages=None):
    """Blocked paged attention with an online softmax; same contract as the reference."""
    b, qn, h, d = q.shape
    _, page_size, kvh, _ = k_pages.shape
    num_table_pages = page_table.shape[1]
    if block_pages is None:
        block_pages = max(1, min(num_table_pages, 256 // page_size))
    block_pages = min(block_pages, num_table_pages)
    num_blocks_total = -(-num_table_pages // block_pages)
    pad = num_blocks_total * block_pages - num_table_pages
    if pad:
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    block_kv = block_pages * page_size
    qg = _group(q, kvh).astype(jnp.float32) * scale  # [B, Q, KVH, G, D]
    g = h // kvh
    # Only blocks up to the longest sequence are visited.
    num_blocks = jnp.minimum((jnp.max(kv_lens) + block_kv - 1) // block_kv, num_blocks_total)

    def body(state):
        j, m, l, acc = state
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * block_pages, block_pages, axis=1)  # [B, bp]
        k = k_pages[pages].reshape(b, block_kv, kvh, d).astype(jnp.float32)  # [B, bk, KVH, D]
        v = v_pages[pages].reshape(b, block_kv, kvh, d).astype(jnp.float32)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k)  # [B, KVH, G, Q, bk]
        key_pos = j * block_kv + jnp.arange(block_kv)
        mask = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
        mask = mask[:, None, None]  # [B, 1, 1, Q, bk]
        s = jnp.where(mask, s, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, v)
        return j + 1, m_new, l, acc

    init = (
        jnp.int32(0),
        jnp.full((b, kvh, g, qn), _NEG_INF, jnp.float32),
        jnp.zeros((b, kvh, g, qn), jnp.float32),
        jnp.zeros((b, kvh, g, qn, d), jnp.float32),
    )
    _, _, l, acc = jax.lax.while_loop(lambda s: s[0] < num_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, KVH, G, Q, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, qn, h, d).astype(q.dtype)
