"""How keys and values are kept in the paged KV cache, and read back for attention.

A cache dtype (float32, float16, bfloat16) has a storage dtype: its own, except bfloat16, which is stored as
its 16-bit pattern in a uint16 array. XLA's CPU gather of bfloat16 elements out of a large buffer is about
100x slower than of 16-bit integers (measured: 1 s against 10 ms per layer for 32 rows of 1,000 tokens),
and widening bfloat16 bits to float32 is a 16-bit shift, exact. The forward writes with `to_storage` and
attention reads with `to_float32`; nothing else looks inside the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BITS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype of the cache arrays that hold keys and values of `dtype`."""
    return _BITS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def cache_dtype(storage) -> jnp.dtype:
    """The inverse of storage_dtype: the dtype the keys and values held in `storage` arrays have."""
    return next((dtype for dtype, bits in _BITS.items() if bits == jnp.dtype(storage)), jnp.dtype(storage))


def to_storage(x, storage) -> jax.Array:
    """Keys or values (any float dtype) as they are written into a cache of storage dtype `storage`."""
    storage = jnp.dtype(storage)
    dtype = cache_dtype(storage)
    if dtype == storage:
        return x.astype(storage)
    return jax.lax.bitcast_convert_type(x.astype(dtype), storage)


def to_float32(x) -> jax.Array:
    """Keys or values read from a cache (or fresh, in any float dtype) as float32."""
    if x.dtype == jnp.uint16:  # bfloat16 bits: the high half of a float32
        return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    return x.astype(jnp.float32)
