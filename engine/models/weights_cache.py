"""A GGUF model's converted weights kept on disk, so that the next start skips parsing the file's
metadata and dequantizing its tensors (most of a GGUF load).

    load(directory, source, dtype) -> (ModelConfig, params) or None
    store(directory, source, dtype, cfg, params)

One file per (GGUF file, dtype), `<directory>/<digest of path and dtype>.weights`: a pickled header
(what the entry is valid for, the ModelConfig, the params' tree and each leaf's shape, dtype and
offset), then each leaf's bytes at an aligned offset, read back through a memory map. An entry is
valid for the GGUF file's path, size and modification time, the dtype, and the sources of the code
that converts (the loader and what it imports: engine.source_digest); a new conversion replaces the
entry of the same file and dtype, so each keeps one. Writes go to a temporary file renamed into
place; an entry that cannot be read is converted again. Models over MAX_CACHED_BYTES are not kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from typing import Optional

import numpy as np

from kvloom.engine.config import ModelConfig
from kvloom.engine.models.source import ModelSource
from kvloom.engine.source_digest import source_digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_CACHED_BYTES = 4 << 30
_ALIGN = 64
CONVERTER_MODULE = "kvloom.engine.models.loader"


def _entry_path(directory: str, source: ModelSource, dtype: str) -> str:
    name = hashlib.sha256(f"{os.path.abspath(source.path)}\0{dtype}".encode()).hexdigest()[:32]
    return os.path.join(directory, f"{name}.weights")


def _validity(source: ModelSource, dtype: str) -> tuple:
    st = os.stat(source.path)
    return (FORMAT_VERSION, os.path.abspath(source.path), st.st_size, st.st_mtime_ns, dtype,
            source_digest([CONVERTER_MODULE]))


def load(directory: str, source: ModelSource, dtype: str) -> Optional[tuple[ModelConfig, dict]]:
    """The stored (config, params as JAX arrays) of this GGUF file and dtype, or None."""
    import jax
    import jax.numpy as jnp

    path = _entry_path(directory, source, dtype)
    try:
        with open(path, "rb") as f:
            header = pickle.load(f)
        if header["validity"] != _validity(source, dtype):
            return None
        leaves = [jnp.asarray(np.memmap(path, dtype=jnp.dtype(leaf_dtype), mode="r", offset=offset,
                                        shape=tuple(shape)))
                  for shape, leaf_dtype, offset in header["leaves"]]
        return header["config"], jax.tree_util.tree_unflatten(header["tree"], leaves)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - truncated, or written by another version: convert again
        log.warning("ignoring unreadable converted weights %s: %s", path, exc)
        return None


def store(directory: str, source: ModelSource, dtype: str, cfg: ModelConfig, params) -> None:
    """Keep the converted params for the next load; failing to store never fails a load."""
    import jax

    flat, tree = jax.tree_util.tree_flatten(params)
    if sum(leaf.nbytes for leaf in flat) > MAX_CACHED_BYTES:
        return
    path, tmp = _entry_path(directory, source, dtype), None
    try:
        arrays = [np.asarray(leaf) for leaf in flat]
        header = {"validity": _validity(source, dtype), "config": cfg, "tree": tree, "leaves": []}
        # offsets past the header: its size depends on the offsets' digits, so leave room for them
        offset = len(pickle.dumps(dict(header, leaves=[(a.shape, str(a.dtype), 1 << 62) for a in arrays])))
        for a in arrays:
            offset = -(-offset // _ALIGN) * _ALIGN
            header["leaves"].append((a.shape, str(a.dtype), offset))
            offset += a.nbytes
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".weights.", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(pickle.dumps(header))
            for a, (_, _, at) in zip(arrays, header["leaves"]):
                f.seek(at)
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not keep the converted weights in %s: %s", directory, exc)
    finally:
        if tmp is not None:
            os.unlink(tmp)
