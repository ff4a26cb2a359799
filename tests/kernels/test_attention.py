"""The blocked paged attention against its pure-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import paged_attention, paged_attention_reference


def _case(rng, *, rows, qn, heads, kv_heads, dim, page_size, num_table_pages, dtype):
    num_pages = 1 + rows * num_table_pages
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, dim)).astype(np.float32)
    table = 1 + rng.permutation(rows * num_table_pages).reshape(rows, num_table_pages).astype(np.int32)
    capacity = num_table_pages * page_size
    kv_lens = rng.integers(qn, capacity + 1, size=rows).astype(np.int32)
    kv_lens[-1] = 0  # a padding row sees nothing
    positions = (kv_lens[:, None] - qn + np.arange(qn)[None, :]).clip(min=0).astype(np.int32)
    q = rng.standard_normal((rows, qn, heads, dim)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(k_pages), cast(v_pages), jnp.asarray(table), jnp.asarray(kv_lens), jnp.asarray(positions)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("qn", [1, 7])
def test_blocked_matches_reference(dtype, tol, page_size, qn):
    rng = np.random.default_rng(page_size * 10 + qn)
    args = _case(rng, rows=4, qn=qn, heads=4, kv_heads=2, dim=16, page_size=page_size,
                 num_table_pages=max(2, 40 // page_size), dtype=dtype)
    ref = paged_attention_reference(*args, scale=0.25)
    for block_pages in (3, None):
        out = jax.jit(lambda *a: paged_attention(*a, scale=0.25, block_pages=block_pages))(*args)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    assert np.all(np.asarray(ref, np.float32)[-1] == 0)  # the kv_len-0 row


def test_reference_is_causal_attention():
    """One sequence in order pages equals plain causal softmax attention."""
    rng = np.random.default_rng(0)
    s, h, d = 12, 2, 8
    q, k, v = (rng.standard_normal((s, h, d)).astype(np.float32) for _ in range(3))
    page_size = 4
    k_pages = jnp.concatenate([jnp.zeros((1, page_size, h, d)), jnp.asarray(k).reshape(3, page_size, h, d)])
    v_pages = jnp.concatenate([jnp.zeros((1, page_size, h, d)), jnp.asarray(v).reshape(3, page_size, h, d)])
    out = paged_attention_reference(jnp.asarray(q)[None], k_pages, v_pages, jnp.array([[1, 2, 3]], jnp.int32),
                                    jnp.array([s], jnp.int32), jnp.arange(s, dtype=jnp.int32)[None], scale=d ** -0.5)
    scores = np.einsum("qhd,khd->hqk", q, k) * d ** -0.5
    scores = np.where(np.tril(np.ones((s, s), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out[0]), np.einsum("hqk,khd->qhd", probs, v), atol=1e-5)
