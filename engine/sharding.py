"""Tensor parallelism: a one-axis `Mesh` ("tp") and the placement of weights and KV cache on it.

The model family declares how each of its leaves splits (`PartitionSpec`s beside its name-mapping
table, e.g. `llama.LAYER_SHARDING`); this module builds the mesh, checks that the model divides over
it, and places arrays with `NamedSharding`s. XLA's partitioner then runs every jitted function whose
inputs carry these shardings on all the mesh's devices, inserting the collectives the layout implies.
Across processes (`jax.distributed`) the mesh spans every process's devices; placement builds each
process's own shards from the same host data, so it works the same in one process or many.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvloom.engine.config import ConfigError, ModelConfig

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A mesh over the first `tensor_parallel_size` devices (of every process, in process order)."""
    devices = jax.devices()
    if tensor_parallel_size > len(devices):
        raise ConfigError(
            f"tensor_parallel_size: {tensor_parallel_size} devices asked for, but only {len(devices)} exist "
            f"({jax.process_count()} process(es), platform {devices[0].platform})")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def kv_head_replicas(cfg: ModelConfig, tp: int) -> int:
    """How many copies of each KV head the mesh needs (1 when the KV heads split evenly); raises a
    ConfigError naming the head counts when `tp` cannot split the model's heads."""
    if cfg.num_heads % tp:
        raise ConfigError(
            f"tensor_parallel_size: {tp} does not divide the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % tp == 0:
        return 1
    if tp % cfg.num_kv_heads:
        raise ConfigError(
            f"tensor_parallel_size: {tp} neither divides nor is a multiple of the model's "
            f"{cfg.num_kv_heads} KV heads")
    return tp // cfg.num_kv_heads


def named(mesh: Mesh, specs):
    """A pytree of PartitionSpecs -> the same pytree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def place(array, sharding: NamedSharding) -> jax.Array:
    """Each of this process's devices gets its shard of `array` (the same host data in every process)."""
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_tree(tree, shardings):
    return jax.tree.map(place, tree, shardings)


def zeros(shape, dtype, sharding: NamedSharding) -> jax.Array:
    """A sharded array of zeros, built in place on each device (never whole on one)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def shard_shape(array: jax.Array) -> tuple[int, ...]:
    return array.sharding.shard_shape(array.shape)


def describe(mesh: Mesh) -> dict:
    """The mesh for /status: its size, devices and processes."""
    devices = mesh.devices.reshape(-1)
    return {
        "tensor_parallel_size": int(devices.size),
        "devices": [str(d) for d in devices],
        "num_processes": len({d.process_index for d in devices}),
        "platform": devices[0].platform,
    }
