"""Prompt logprobs on the device: for each token of a step, the logprob of the prompt token that follows it
and the most likely alternatives, from the final hidden states the forward already computed.

    forward (runner)  -> hidden [T, D] of every token of the step, left on the device
    targets(...)      -> [T] int32: the next prompt token of each token of a row's `prompt_targets`, or -1
    prompt_logprobs   -> ([T] logprob of the target, [T, K] top ids, [T, K] top logprobs), jitted
    gather(...)       -> the entries of the rows' targets, in batch order (`StepResult.prompt_*`)

One compiled function per step length T, all compiled at warm-up; the runner calls it only for batches
with prompt targets. The vocabulary projection runs over blocks of tokens (`lax.map`), so a long step
never holds [T, V] logits at once. Logprobs are those of the raw model distribution (log-softmax of the
logits, as `engine.sampling` reports for generated tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvloom.engine.models import llama
from kvloom.engine.request import MAX_TOP_LOGPROBS

BLOCK_TOKENS = 64  # tokens projected onto the vocabulary at once


def prompt_logprobs(params, hidden, targets, *, cfg):
    """hidden: [T, D] final hidden states; targets: [T] int32 (-1: none) -> (logprobs [T] float32 of each
    target (0 where none), top ids [T, K] int32, top logprobs [T, K] float32)."""

    def one(x):
        h, target = x  # h: [D]
        logprobs = jax.nn.log_softmax(llama.logits_from_hidden(params, h[None], cfg=cfg)[0])  # [V]
        top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
        chosen = jnp.where(target >= 0, logprobs[jnp.maximum(target, 0)], 0.0)
        return chosen, top_ids.astype(jnp.int32), top_logprobs

    return jax.lax.map(one, (hidden, targets), batch_size=BLOCK_TOKENS)


def targets(num_tokens: int, rows) -> np.ndarray:
    """rows: (index of the row's first token in the step, the row's prompt targets) -> [num_tokens] int32."""
    out = np.full(num_tokens, -1, np.int32)
    for base, row_targets in rows:
        out[base:base + len(row_targets)] = row_targets
    return out


def gather(outputs, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device outputs of `prompt_logprobs` at the rows' targets, rows in order, as host arrays."""
    index = np.concatenate([base + np.arange(len(row_targets)) for base, row_targets in rows])
    chosen, top_ids, top_logprobs = (np.asarray(x)[index] for x in outputs)
    return chosen, top_ids, top_logprobs
