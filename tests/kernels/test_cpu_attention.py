"""The native attention kernels (kernels/cpu_attention.cc for decode steps, kernels/cpu_extend_attention.cc
for longer ones, through kernels/cpu_kernels) against the pure-jnp reference: cache dtypes, page sizes,
head sizes and groups, a padding row, a row with no past, packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvloom.kernels.attention import prefix_extend_attention, prefix_extend_attention_reference
from tests.kernels.test_attention import _case

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.float16, 2e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(16, 4, 2), (64, 9, 3), (32, 4, 4), (128, 2, 1)])
def test_decode_attention_matches_reference(kernels, dtype, tol, page_size, dim, heads, kv_heads):
    rng = np.random.default_rng(page_size * 1000 + dim + heads)
    args = _case(rng, rows=5, qn=1, heads=heads, kv_heads=kv_heads, dim=dim, page_size=page_size,
                 num_table_pages=max(2, 48 // page_size), dtype=dtype)
    args = (*args[:7], args[7].at[0].set(0))  # row 0 has no past; the last row is padding (_case)
    ref = prefix_extend_attention_reference(*args, scale=dim ** -0.5, layer=1)
    fn = jax.jit(lambda *a: prefix_extend_attention(*a, scale=dim ** -0.5, layer=jnp.int32(1),
                                                    kernel=kernels))
    assert "custom_call" in fn.lower(*args).as_text()  # the kernel, not XLA's loop over page blocks
    out = fn(*args)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    assert np.all(np.asarray(out, np.float32)[-1] == 0)  # the padding row


def _extend(kernels, args, dim, segment_ids=None):
    fn = jax.jit(lambda *a: prefix_extend_attention(*a, scale=dim ** -0.5, layer=jnp.int32(1), kernel=kernels,
                                                    segment_ids=segment_ids))
    hlo = fn.lower(*args).as_text()
    assert "custom_call" in hlo and "while" not in hlo  # the kernel, not XLA's loop over page blocks
    return fn(*args)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.float16, 2e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dim,heads,kv_heads,qn", [(16, 4, 2, 7), (64, 9, 3, 70), (32, 4, 4, 2),
                                                   (128, 2, 1, 33), (64, 16, 1, 5)])
def test_extend_attention_matches_reference(kernels, dtype, tol, page_size, dim, heads, kv_heads, qn):
    """Several new tokens per row (a prefill chunk, a verify step): pasts of up to ~3 blocks of keys,
    query blocks of up to 48 rows, new keys in more than one block."""
    rng = np.random.default_rng(page_size * 1000 + dim + heads + qn)
    args = _case(rng, rows=4, qn=qn, heads=heads, kv_heads=kv_heads, dim=dim, page_size=page_size,
                 num_table_pages=max(2, (qn + 160) // page_size), dtype=dtype)
    args = (*args[:7], args[7].at[0].set(0))  # row 0 has no past; the last row is padding (_case)
    ref = prefix_extend_attention_reference(*args, scale=dim ** -0.5, layer=1)
    out = _extend(kernels, args, dim)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)
    assert np.all(np.asarray(out, np.float32)[-1] == 0)  # the padding row
    new_lens = np.asarray(args[3])
    for row, n in enumerate(new_lens):
        assert np.all(np.asarray(out, np.float32)[row, n:] == 0)  # tokens past new_lens


def test_extend_attention_keeps_packed_segments_apart(kernels):
    """Scoring's packed items: each sees the shared past and its own segment's new keys causally; the
    padding after the items (segment -1) gives zeros."""
    rng = np.random.default_rng(7)
    items = [20, 3, 45, 1, 17, 30]
    qn = sum(items) + 12
    args = _case(rng, rows=2, qn=qn, heads=9, kv_heads=3, dim=64, page_size=16, num_table_pages=12,
                 dtype=jnp.float32)
    segments = np.full((2, qn), -1, np.int32)
    segments[0, :sum(items)] = np.repeat(np.arange(len(items)), items)
    new_lens = np.asarray([sum(items), 0], np.int32)
    args = (*args[:3], jnp.asarray(new_lens), *args[4:])
    ref = prefix_extend_attention_reference(*args, scale=0.125, layer=1, segment_ids=jnp.asarray(segments))
    out = _extend(kernels, args, 64, jnp.asarray(segments))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(out)[0, sum(items):] == 0) and np.all(np.asarray(out)[1] == 0)


def test_what_the_kernel_does_not_handle_stays_on_xla(kernels):
    """A head size it has no code for, or more query heads per KV head than it holds: XLA's blocked
    attention."""
    assert not kernels.handles_attention(24, 2, jnp.float32)
    assert not kernels.handles_attention(64, 17, jnp.float32)
    assert all(kernels.handles_attention(64, 3, s) for s in (jnp.float32, jnp.float16, jnp.uint16))
    rng = np.random.default_rng(0)
    for qn in (1, 3):
        args = _case(rng, rows=2, qn=qn, heads=4, kv_heads=2, dim=24, page_size=4, num_table_pages=4,
                     dtype=jnp.float32)
        fn = jax.jit(lambda *a: prefix_extend_attention(*a, scale=0.25, layer=jnp.int32(0), kernel=kernels))
        assert "custom_call" not in fn.lower(*args).as_text()
