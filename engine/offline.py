"""Static-batch forward passes over the paged cache, with no scheduler.

Each sequence of a fixed batch owns a contiguous run of pages (page 0 stays the
padding sink). Used to check the model against transformers, prefill and decode,
and by tools that need raw logits. The forward is the runner's own (`engine.forward`); only the
page assignment differs from the serving path.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from kvloom.engine.config import ModelConfig
from kvloom.engine.models import llama
from kvloom.engine.forward import LayeredForward


class StaticBatch:
    """A batch of sequences with statically assigned pages and their own KV cache."""

    def __init__(self, cfg: ModelConfig, params, *, num_seqs: int, max_len: int, page_size: int, mesh=None,
                 kv_dtype=None, kernel=None):
        """`mesh`: params placed by `llama.shard_params` on it; the KV cache is split the same way.
        `kv_dtype`: the KV cache's (default: the weights'). `kernel`: the decode steps' native kernels
        (kernels.cpu_kernels), or None."""
        self.cfg, self.params, self.page_size = cfg, params, page_size
        self.pages_per_seq = -(-max_len // page_size)
        self.page_table = (1 + np.arange(num_seqs * self.pages_per_seq, dtype=np.int32)).reshape(
            num_seqs, self.pages_per_seq
        )
        num_pages = 1 + num_seqs * self.pages_per_seq
        kv_dtype = kv_dtype or params["embed"].dtype
        if mesh is None:
            self.kv = llama.init_kv_cache(cfg, num_pages, page_size, kv_dtype)
        else:
            self.kv = llama.sharded_kv_cache(cfg, params, num_pages, page_size, mesh, kv_dtype)
        self.lengths = np.zeros(num_seqs, np.int32)
        self._step = LayeredForward.jitted(cfg, page_size, mesh, kernel=kernel)

    def reset(self) -> None:
        """Empty every sequence; the next extend starts over on the same cache and compiled step."""
        self.lengths[:] = 0

    def extend(self, token_lists: list[list[int]], last_only: bool = False) -> np.ndarray:
        """Append tokens to every sequence (ragged); returns float32 logits of all new tokens, [N, V]
        in sequence order (last_only: of each sequence's last new token, [B, V]). One segment, padded
        to the longest list."""
        rows = len(token_lists)
        qn = max(len(t) for t in token_lists)
        ids = np.zeros((rows, qn), np.int32)
        pos = np.zeros((rows, qn), np.int32)
        slots = np.zeros((rows, qn), np.int32)  # padding writes to page 0
        logits_idx = []
        past = self.lengths[:rows].copy()
        for r, toks in enumerate(token_lists):
            n, start = len(toks), int(self.lengths[r])
            p = start + np.arange(n)
            ids[r, :n], pos[r, :n] = toks, p
            slots[r, :n] = self.page_table[r, p // self.page_size] * self.page_size + p % self.page_size
            logits_idx.extend([r * qn + n - 1] if last_only else r * qn + np.arange(n))
            self.lengths[r] += n
        step = llama.StepInput(
            token_ids=jnp.asarray(ids.reshape(-1)),
            positions=jnp.asarray(pos.reshape(-1)),
            slot_mapping=jnp.asarray(slots.reshape(-1)),
            logits_indices=jnp.asarray(np.array(logits_idx, np.int32)),
            segments=(llama.Segment(jnp.asarray(self.page_table[:rows]), jnp.asarray(past),
                                    jnp.asarray(self.lengths[:rows] - past), qn),),
        )
        logits, _, self.kv = self._step(self.params, self.kv, step)
        return np.asarray(logits)


def greedy_generate(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int,
                    *, page_size: int = 16, stop_ids: tuple[int, ...] = (), mesh=None) -> list[list[int]]:
    """Greedy continuation of each prompt; a sequence stops at a stop id (not included). `mesh`: as
    for StaticBatch."""
    batch = StaticBatch(cfg, params, num_seqs=len(prompts),
                        max_len=max(map(len, prompts)) + max_new_tokens, page_size=page_size, mesh=mesh)
    logits = batch.extend(prompts)
    ends = np.cumsum([len(p) for p in prompts]) - 1
    next_ids = logits[ends].argmax(-1)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        for i, tok in enumerate(next_ids):
            if not done[i]:
                if int(tok) in stop_ids:
                    done[i] = True
                else:
                    outputs[i].append(int(tok))
        if all(done) or all(len(o) >= max_new_tokens for o in outputs):
            break
        next_ids = batch.extend([[int(t)] for t in next_ids]).argmax(-1)
    return [o[:max_new_tokens] for o in outputs]
