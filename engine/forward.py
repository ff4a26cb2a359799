"""The model step as separately compiled pieces, dispatched layer by layer from the compute thread.

    step (host arrays)  -> placed on the mesh once per step
    embed               jitted: the token embeddings [T, D] (of the token ids only); a token whose
                        `prev_index` is set is read from `prev_tokens`, the step before's sampled
                        tokens still on the device (a step built one ahead: engine.batch)
    layers x L/G        jitted, G consecutive decoder layers per call (`layers_per_call`), one executable
                        per step shape shared by every group: each call gets its layers' own weight
                        arrays, the KV cache (read only) and its first layer's index as a traced int32,
                        and returns h and each layer's new keys and values
    finish              jitted, the KV cache donated: every layer's new keys and values written at
                        the step's slots, the final norm, float32 logits of `logits_indices`
    (embed and finish take only the arrays they read, the weights included (`_HEAD`): steps of different
    shapes with the same token and logits counts share their executables, no two step shapes lower to one
    identical program, and a call does not walk the whole weight tree: passing every layer's weights to
    embed and finish cost ~4 ms of host time per step, a tenth of a batch-1 decode step)
    -> (logits [S, V], final hidden states [T, D], the new KV cache)

Why pieces (measured with tools.profile_step): one program over all layers either runs a `lax.scan`
over stacked weights, which on a CPU copies every layer's weights out of the stack on every step (a
third to a half of a decode step), or unrolls the layers, which multiplies compile time by the depth
(minutes to start the default model). Compiled apart, a step reads each weight once and compiles one
group of layers per shape; what it costs is L/G + 2 executions per step. Each execution has a fixed
cost on XLA's CPU runtime beyond its Python dispatch (a batch-32 decode step of the default model ran
its layers ~15% faster in groups of 5 than one by one; a group of 5 compiles in ~1.6x one layer's time),
and a step ahead (engine.batch) needs the whole step within the device's queue of in-flight
executions (32 on XLA's CPU client). `engine.models.llama.forward` composes the same functions in one
trace: it is their definition, and tests hold the two equal.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kvloom.engine import sharding
from kvloom.engine.config import ModelConfig
from kvloom.engine.models import llama


_HEAD = ("embed", "final_norm", "lm_head")  # the weights outside the layers: all that embed and finish read


def _head(params) -> dict:
    return {name: params[name] for name in _HEAD if name in params}  # no lm_head: tied to the embedding


def _embed(params, token_ids, prev_tokens, prev_index):
    """Embeddings of the step's tokens; token t is prev_tokens[prev_index[t]] where prev_index[t] >= 0."""
    ids = jnp.where(prev_index >= 0, prev_tokens[jnp.maximum(prev_index, 0)], token_ids)
    return llama.embed(params, ids)


def _finish(params, kv, h, keys, values, slot_mapping, logits_indices, *, cfg: ModelConfig, kernel=None):
    kv = llama.write_kv_cache(kv, keys, values, slot_mapping)
    h = llama.final_norm(params, h, cfg=cfg)
    return llama.logits_from_hidden(params, h[logits_indices], cfg=cfg, kernel=kernel), h, kv


def forward_functions(cfg: ModelConfig, page_size: int, mesh, kernel=None) -> dict:
    """The pieces, name -> (function, jax.jit options), for params placed on `mesh`: the runner compiles
    them ahead of time (engine.executables), `LayeredForward.jitted` with jax.jit. `kernel`: the CPU
    kernels (kernels.cpu_kernels: a decode step's matmuls, every step's attention), or None."""
    whole = NamedSharding(mesh, P())
    kv_sharding = NamedSharding(mesh, llama.KV_CACHE_SHARDING)
    logits_sharding = NamedSharding(mesh, llama.logits_sharding(cfg, mesh.size))
    return dict(
        embed=(_embed, dict(out_shardings=whole)),
        layers=(partial(llama.decoder_layers, cfg=cfg, page_size=page_size, kernel=kernel), {}),
        # the hidden states are whole on every device (prompt logprobs project them when asked)
        finish=(partial(_finish, cfg=cfg, kernel=kernel),
                dict(donate_argnums=(1,), out_shardings=(logits_sharding, whole, (kv_sharding,) * 2))))


def _compiled(fn, *args):
    """The executable of `fn` (jax.jit or engine.executables.AotFunction) for these arguments."""
    return fn.prepare(*args) if hasattr(fn, "prepare") else fn.lower(*args).compile()


def _struct(info) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=getattr(info, "sharding", None))


class LayeredForward:
    """`forward(params, kv, step) -> (logits, hidden, kv)` with the KV cache donated, from the three
    compiled pieces of `forward_functions`, for params placed on `mesh`."""

    def __init__(self, embed, layers, finish, mesh, num_prev_tokens: int = 1, layers_per_call: int = 1):
        """num_prev_tokens: the length of the sampled-token arrays that pending tokens are read from
        (`SamplingOutput.next_inputs`); a step without pending tokens gets zeros of that length, so every
        step of one token count shares one embed executable. layers_per_call: G, dividing the layer
        count (`EngineConfig.layers_per_call_for`)."""
        self._embed, self._layers, self._finish, self.mesh = embed, layers, finish, mesh
        self.layers_per_call = layers_per_call
        self._whole = NamedSharding(mesh, P())
        self._no_prev_tokens = sharding.place(np.zeros(num_prev_tokens, np.int32), self._whole)

    @classmethod
    def jitted(cls, cfg: ModelConfig, page_size: int, mesh=None,
               layers_per_call: int = 1, kernel=None) -> "LayeredForward":
        """The pieces under jax.jit (one device when `mesh` is None)."""
        mesh = mesh if mesh is not None else sharding.make_mesh(1)
        pieces = forward_functions(cfg, page_size, mesh, kernel)
        fns = {name: jax.jit(fn, **options) for name, (fn, options) in pieces.items()}
        return cls(fns["embed"], fns["layers"], fns["finish"], mesh, layers_per_call=layers_per_call)

    def _groups(self, params) -> list[tuple[int, tuple]]:
        """(first layer index, the group's weights) of each call."""
        layers, g = params["layers"], self.layers_per_call
        if len(layers) % g:
            raise ValueError(f"layers_per_call {g} does not divide the model's {len(layers)} layers")
        return [(first, tuple(layers[first:first + g])) for first in range(0, len(layers), g)]

    def place(self, step: llama.StepInput) -> llama.StepInput:
        """The step's host arrays, whole on every device of the mesh: copied once, read by every piece."""
        return jax.tree.map(lambda a: sharding.place(a, self._whole), step)

    def _pending(self, step: llama.StepInput, pending):
        """(prev_tokens, prev_index) on the mesh: `pending` as given, or none (every index -1)."""
        if pending is None:
            pending = (self._no_prev_tokens, np.full(len(step.token_ids), -1, np.int32))
        return tuple(a if isinstance(a, jax.Array) else sharding.place(a, self._whole) for a in pending)

    def __call__(self, params, kv, step: llama.StepInput, pending=None):
        """`pending`: (prev_tokens, prev_index) for `_embed`; None: every token is in step.token_ids."""
        prev_tokens, prev_index = self._pending(step, pending)
        step = self.place(step)
        head = _head(params)
        h = self._embed(head, step.token_ids, prev_tokens, prev_index)
        keys, values, run_layers = [], [], self._layers
        for first, group in self._groups(params):
            if first == 0 and hasattr(self._layers, "prepare"):
                # every group has the first one's signature: look its executable up once per step
                # (a lookup reads the whole argument tree, a third of a batch-1 step's dispatch cost)
                run_layers = self._layers.prepare(group, h, kv, np.int32(first), step)
            h, k, v = run_layers(group, h, kv, np.int32(first), step)
            keys += k
            values += v
        return self._finish(head, kv, h, tuple(keys), tuple(values), step.slot_mapping, step.logits_indices)

    @property
    def num_compiled(self) -> int:
        return self._embed._cache_size() + self._layers._cache_size() + self._finish._cache_size()

    def _pieces(self, params, kv, step: llama.StepInput, pending=None):
        """(compiled embed, compiled layers, compiled finish) for a step of this shape; `kv` may be
        shapes only (jax.ShapeDtypeStruct): nothing runs."""
        prev_tokens, prev_index = self._pending(step, pending)
        step = self.place(step)
        head = _head(params)
        embed = _compiled(self._embed, head, step.token_ids, prev_tokens, prev_index)
        h = _struct(embed.out_info)
        first, group = self._groups(params)[0]
        layers = _compiled(self._layers, group, h, kv, np.int32(first), step)
        k, v = (_struct(info[0]) for info in layers.out_info[1:])
        num_layers = len(params["layers"])
        finish = _compiled(self._finish, head, kv, h, (k,) * num_layers, (v,) * num_layers,
                           step.slot_mapping, step.logits_indices)
        return embed, layers, finish

    def prepare(self, params, kv, step: llama.StepInput, pending=None):
        """Compile (or load) every piece a step of this shape runs; returns the last one, whose `out_info`
        is the step's (logits, hidden, kv)."""
        return self._pieces(params, kv, step, pending)[-1]

    def compiled_hlo(self, params, kv, step: llama.StepInput, pending=None) -> list[str]:
        """The optimized HLO text of each piece a step of this shape runs (the layer group's once)."""
        return [piece.as_text() for piece in self._pieces(params, kv, step, pending)]
