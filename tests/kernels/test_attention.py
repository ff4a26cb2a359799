"""The blocked prefix+extend attention against its pure-jnp reference, and the reference against
plain causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvloom.kernels.attention import prefix_extend_attention, prefix_extend_attention_reference
from kvloom.kernels.kv_format import cache_dtype, storage_dtype, to_float32, to_storage


def _case(rng, *, rows, qn, heads, kv_heads, dim, page_size, num_table_pages, dtype, layers=2):
    num_pages = 1 + rows * num_table_pages
    k_cache = rng.standard_normal((layers, num_pages, page_size, kv_heads, dim)).astype(np.float32)
    v_cache = rng.standard_normal((layers, num_pages, page_size, kv_heads, dim)).astype(np.float32)
    table = 1 + rng.permutation(rows * num_table_pages).reshape(rows, num_table_pages).astype(np.int32)
    capacity = num_table_pages * page_size
    past_lens = rng.integers(0, capacity - qn + 1, size=rows).astype(np.int32)
    new_lens = rng.integers(1, qn + 1, size=rows).astype(np.int32)
    past_lens[-1], new_lens[-1] = 0, 0  # a padding row
    q = rng.standard_normal((rows, qn, heads, dim)).astype(np.float32)
    k_new = rng.standard_normal((rows, qn, kv_heads, dim)).astype(np.float32)
    v_new = rng.standard_normal((rows, qn, kv_heads, dim)).astype(np.float32)
    c = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    s = lambda a: to_storage(jnp.asarray(a), storage_dtype(dtype))  # noqa: E731  (as the forward writes)
    return (c(q), s(k_new), s(v_new), jnp.asarray(new_lens), s(k_cache), s(v_cache), jnp.asarray(table),
            jnp.asarray(past_lens))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("qn", [1, 7])
def test_blocked_matches_reference(dtype, tol, page_size, qn):
    rng = np.random.default_rng(page_size * 10 + qn)
    args = _case(rng, rows=4, qn=qn, heads=4, kv_heads=2, dim=16, page_size=page_size,
                 num_table_pages=max(2, 40 // page_size), dtype=dtype)
    ref = prefix_extend_attention_reference(*args, scale=0.25, layer=1)
    for block_pages, new_key_block in ((3, 3), (None, 128)):  # small blocks: several per row of each part
        fn = jax.jit(lambda *a: prefix_extend_attention(*a, scale=0.25, layer=1, block_pages=block_pages,
                                                        new_key_block=new_key_block))
        out = fn(*args)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol,
                                   rtol=tol)
    assert np.all(np.asarray(ref, np.float32)[-1] == 0)  # the padding row


@pytest.mark.parametrize("new_key_block", [2, 3, 128])
def test_packed_segments_match_reference(new_key_block):
    """Independent extensions packed in one row (multi-item scoring) see only their own segment's new
    keys, whatever block of query rows they fall in."""
    rng = np.random.default_rng(new_key_block)
    args = _case(rng, rows=2, qn=9, heads=4, kv_heads=2, dim=16, page_size=4, num_table_pages=6,
                 dtype=jnp.float32)
    segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3, 3]], jnp.int32)
    ref = prefix_extend_attention_reference(*args, scale=0.25, layer=0, segment_ids=segment_ids)
    out = jax.jit(lambda *a: prefix_extend_attention(*a, scale=0.25, layer=0, segment_ids=segment_ids,
                                                     new_key_block=new_key_block))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_the_cache_keeps_each_dtype_s_values(dtype):
    """bfloat16 is stored as its bits (uint16) and read back exactly as bfloat16 rounds; the others as
    themselves."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)) * 100, jnp.float32)
    stored = to_storage(x, storage_dtype(dtype))
    assert stored.dtype == (jnp.uint16 if dtype == jnp.bfloat16 else dtype)
    assert cache_dtype(stored.dtype) == dtype
    np.testing.assert_array_equal(np.asarray(to_float32(stored)), np.asarray(x.astype(dtype), np.float32))


def test_reference_is_causal_attention():
    """A sequence split into a cached past and a new chunk equals plain causal softmax attention."""
    rng = np.random.default_rng(0)
    s, past, h, d, page_size = 12, 8, 2, 8, 4
    q, k, v = (rng.standard_normal((s, h, d)).astype(np.float32) for _ in range(3))
    pad = np.zeros((1, page_size, h, d), np.float32)
    k_cache = jnp.asarray(np.concatenate([pad, k[:past].reshape(2, page_size, h, d)]))
    v_cache = jnp.asarray(np.concatenate([pad, v[:past].reshape(2, page_size, h, d)]))
    out = prefix_extend_attention_reference(
        jnp.asarray(q[past:])[None], jnp.asarray(k[past:])[None], jnp.asarray(v[past:])[None],
        jnp.array([s - past]), k_cache, v_cache, jnp.array([[1, 2]], jnp.int32), jnp.array([past]),
        scale=d ** -0.5)
    scores = np.einsum("qhd,khd->hqk", q, k) * d ** -0.5
    scores = np.where(np.tril(np.ones((s, s), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out[0]), np.einsum("hqk,khd->qhd", probs, v)[past:], atol=1e-5)
