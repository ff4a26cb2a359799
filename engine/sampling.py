"""Token sampling and logprobs, jitted, one compiled function per row bucket.

Per row: the logit bias table (OpenAI's logit_bias added, and the tokens that
min_tokens bans set to -inf-like), penalties (repetition on prompt and output
tokens, frequency and presence on output tokens), the token bitmask of a
structured output (tokens its grammar bans set to -inf-like, after everything
else, so nothing brings one back), then greedy argmax at temperature 0, else
temperature, the top-k / top-p / min-p filters and one Gumbel-max draw with a
per-row noise from a hash of (seed, num_output_tokens, token id): the same seed and
prompt give the same tokens whatever else shares the batch.

No full-vocabulary sort (it costs hundreds of ms on a CPU): the top-k and
top-p thresholds come from the 256 best candidates (`lax.top_k`), exact
whenever top_k <= 256 and the nucleus lies within them; when a row's nucleus
is wider, a bisection over the whole vocabulary finds the exact threshold, and
only batches that need it pay for it. Optional work (penalties, sampling,
logprobs) sits behind `lax.cond`, so greedy batches pay for an argmax only.
The bias table and the bitmask have one fixed width per runner, so no request recompiles them.
Logprobs are always those of the raw model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from kvloom.engine.request import MAX_TOP_LOGPROBS

NUM_CANDIDATES = 256
_NEG_INF = -1e30


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingInput:
    """Per-row sampling parameters, [S] each; penalty ids [S, L] padded with -1."""

    temperature: jax.Array
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    seeds: jax.Array  # uint32
    counters: jax.Array  # int32
    prompt_ids: jax.Array  # [S, L] int32, for the repetition penalty
    output_ids: jax.Array  # [S, L] int32
    bias_ids: jax.Array  # [S, K] int32, padded with -1
    bias_values: jax.Array  # [S, K] float32: added to the logit; -inf bans the token
    token_bitmask: jax.Array  # [S, ceil(V / 32)] int32: bit j of word w allows token 32w + j; all ones: any
    any_sampled: jax.Array  # bool scalars: which optional parts run
    any_penalties: jax.Array
    any_logprobs: jax.Array
    any_bias: jax.Array
    any_bitmask: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingOutput:
    token_ids: jax.Array  # [S] int32
    logprobs: jax.Array  # [S] float32, of the sampled token under the raw model distribution
    top_ids: jax.Array  # [S, MAX_TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [S, MAX_TOP_LOGPROBS]
    finite: jax.Array  # [S] bool: the row's logits are all finite
    # token_ids padded with zeros to one length for every S: the step after reads its pending tokens
    # from here on the device (engine.forward's embed), whatever this step's shape
    next_inputs: jax.Array  # [pad_to] int32


def _counts(ids, vocab_size):
    # ids: [S, L] with -1 padding -> [S, V] occurrence counts
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    safe = jnp.where(ids >= 0, ids, vocab_size)  # out of range: dropped
    return jnp.zeros((ids.shape[0], vocab_size), jnp.float32).at[rows, safe].add(1.0, mode="drop")


def apply_logit_bias(logits, inp: SamplingInput):
    """logits [S, V] + each row's (id, bias) entries; a -inf bias sets the logit to a finite -1e30."""
    vocab = logits.shape[-1]
    rows = jnp.broadcast_to(jnp.arange(inp.bias_ids.shape[0])[:, None], inp.bias_ids.shape)
    banned = jnp.isneginf(inp.bias_values)
    added = jnp.where((inp.bias_ids >= 0) & ~banned, inp.bias_ids, vocab)  # out of range: dropped
    logits = logits.at[rows, added].add(jnp.where(banned, 0.0, inp.bias_values), mode="drop")
    bans = jnp.where((inp.bias_ids >= 0) & banned, inp.bias_ids, vocab)
    return logits.at[rows, bans].set(_NEG_INF, mode="drop")


def apply_token_bitmask(logits, bitmask):
    """logits [S, V], bitmask [S, ceil(V / 32)] int32 -> the logits, each token whose bit is 0 at -1e30."""
    s, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32]
    allowed = bits.reshape(s, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, _NEG_INF)


def apply_penalties(logits, inp: SamplingInput):
    vocab = logits.shape[-1]
    seen = (_counts(inp.prompt_ids, vocab) + _counts(inp.output_ids, vocab)) > 0
    rep = inp.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    out_counts = _counts(inp.output_ids, vocab)
    logits = logits - inp.frequency_penalty[:, None] * out_counts
    return logits - inp.presence_penalty[:, None] * (out_counts > 0)


def _top_p_threshold_exact(z, lse, top_p, iterations=40):
    """Per row, the largest t with mass(z >= t) >= top_p, by bisection on t over the full vocabulary."""
    hi = jnp.max(z, axis=-1)
    # Tokens more than 64 below the best hold no mass (e^-64 each), and banned ones sit at -1e30: starting
    # there would spend the bisection's precision on nothing.
    lo = jnp.maximum(jnp.min(z, axis=-1), hi - 64.0)
    probs = jnp.exp(z - lse[:, None])

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        mass = jnp.sum(jnp.where(z >= mid[:, None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return lo


def _filtered_logits(z, inp: SamplingInput):
    """Mask z (temperature-scaled logits, [S, V]) below each row's top-k / top-p / min-p threshold."""
    lse = jax.nn.logsumexp(z, axis=-1)
    k = min(NUM_CANDIDATES, z.shape[-1])
    # The barrier keeps XLA from folding the top-k into a full sort (it does when a gather reads it).
    cand = jax.lax.optimization_barrier(jax.lax.top_k(z, k)[0])  # [S, k], descending
    cand_probs = jnp.exp(cand - lse[:, None])
    cum = jnp.cumsum(cand_probs, axis=-1)
    # top-p keeps each candidate whose preceding mass is below top_p (the crossing token included)
    keep_p = (cum - cand_probs) < inp.top_p[:, None]
    top_p_t = jnp.min(jnp.where(keep_p, cand, jnp.inf), axis=-1)
    nucleus_wider = (inp.top_p < 1.0) & (cum[:, -1] < inp.top_p)
    top_p_t = jax.lax.cond(
        jnp.any(nucleus_wider),
        lambda: jnp.where(nucleus_wider, _top_p_threshold_exact(z, lse, inp.top_p), top_p_t),
        lambda: top_p_t,
    )
    top_p_t = jnp.where(inp.top_p < 1.0, top_p_t, -jnp.inf)
    kth = jnp.take_along_axis(cand, jnp.clip(inp.top_k - 1, 0, k - 1)[:, None], axis=-1)[:, 0]
    top_k_t = jnp.where((inp.top_k > 0) & (inp.top_k <= k), kth, -jnp.inf)
    min_p_t = jnp.where(inp.min_p > 0, cand[:, 0] + jnp.log(jnp.maximum(inp.min_p, 1e-30)), -jnp.inf)
    threshold = jnp.maximum(jnp.maximum(top_p_t, top_k_t), min_p_t)
    return jnp.where(z >= threshold[:, None], z, _NEG_INF)


def gumbel_noise(seeds, counters, vocab_size: int):
    """Gumbel noise [S, V] from a counter-based hash of (seed, counter, token id): each row's noise is a
    pure function of its own seed and count (no key splitting; a fraction of threefry's cost on a CPU)."""
    x = ((seeds[:, None].astype(jnp.uint32) * jnp.uint32(0x9E3779B1))
         ^ (counters[:, None].astype(jnp.uint32) * jnp.uint32(0x85EBCA77))
         ^ (jnp.arange(vocab_size, dtype=jnp.uint32)[None, :] * jnp.uint32(0xC2B2AE3D)))
    x = x ^ (x >> 16)  # the murmur3 finalizer: every input bit reaches every output bit
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    u = ((x >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)  # uniform in (0, 1), both ends excluded
    return -jnp.log(-jnp.log(u))


ARGMAX_BLOCK = 512


def argmax_rows(x):
    """jnp.argmax(x, axis=-1) as int32 (the first index of the maximum), in two levels: the maximum of
    each block of ARGMAX_BLOCK columns, the first block holding the row's maximum, the first index in
    it. XLA's CPU argmax is a variadic (value, index) reduce that does not vectorize: over a 49,152-token
    vocabulary it took 7.7 ms of a batch-32 decode step, this takes a fraction of a millisecond."""
    s, v = x.shape
    block = min(ARGMAX_BLOCK, v)
    pad = -v % block
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    blocks = x.reshape(s, -1, block)
    first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # [S]: the first block with the row's maximum
    row = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]  # [S, block]
    return (first * block + jnp.argmax(row, axis=-1)).astype(jnp.int32)


def rows_finite(x):
    """[S] bool: every value of the row is finite (a NaN or an infinity reaches the row's max or min)."""
    return jnp.isfinite(jnp.max(x, axis=-1)) & jnp.isfinite(jnp.min(x, axis=-1))


def _draw(z, inp: SamplingInput):
    """One Gumbel-max draw per row from softmax(z): an argmax, no running sum, so a row's draw does
    not depend on how the batch around it was laid out."""
    noise = gumbel_noise(inp.seeds, inp.counters, z.shape[-1])
    return argmax_rows(z + noise)


def sample(logits, inp: SamplingInput, pad_to: int = 0) -> SamplingOutput:
    """logits: [S, V] float32 -> one token per row (next_inputs: padded to pad_to, at least S)."""
    x = jax.lax.cond(inp.any_bias, lambda: apply_logit_bias(logits, inp), lambda: logits)
    x = jax.lax.cond(inp.any_penalties, lambda: apply_penalties(x, inp), lambda: x)
    x = jax.lax.cond(inp.any_bitmask, lambda: apply_token_bitmask(x, inp.token_bitmask), lambda: x)
    greedy = argmax_rows(x)

    def sampled():
        t = jnp.where(inp.temperature > 0, inp.temperature, 1.0)
        z = _filtered_logits(x / t[:, None], inp)
        return jnp.where(inp.temperature > 0, _draw(z, inp), greedy)

    tokens = jax.lax.cond(inp.any_sampled, sampled, lambda: greedy)

    def with_logprobs():
        lp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
        return chosen, top_ids.astype(jnp.int32), top_lp

    s = logits.shape[0]
    chosen, top_ids, top_lp = jax.lax.cond(
        inp.any_logprobs, with_logprobs,
        lambda: (jnp.zeros((s,), jnp.float32), jnp.zeros((s, MAX_TOP_LOGPROBS), jnp.int32),
                 jnp.zeros((s, MAX_TOP_LOGPROBS), jnp.float32)),
    )
    next_inputs = jnp.pad(tokens, (0, max(0, pad_to - s)))
    return SamplingOutput(tokens, chosen, top_ids, top_lp, rows_finite(logits), next_inputs)
