"""kvloom's JAX model against HF transformers on tiny random checkpoints of each family."""

import numpy as np
import pytest
import torch

from kvloom.engine.models.loader import load_model
from kvloom.engine.offline import StaticBatch
from tests import tiny_models

PROMPT_LENGTHS = (5, 11, 17)
NUM_DECODE_STEPS = 16
TOL = 1e-4


def _sequences(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, tiny_models.VOCAB_SIZE,
                         size=n + NUM_DECODE_STEPS).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoints):
    """family -> HF logits of each full sequence, [len, V]."""
    cache = {}

    def get(family):
        if family not in cache:
            hf = tiny_models.load_hf(tiny_checkpoints(family))
            with torch.no_grad():
                cache[family] = [hf(torch.tensor([s])).logits[0].numpy() for s in _sequences()]
        return cache[family]

    return get


def _assert_close(ours, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max()) / scale
    assert err < TOL, f"max error {err:.2e} (relative to max |logit| {scale:.2f})"


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefill_and_decode_match_transformers(tiny_checkpoints, reference_logits, family, page_size):
    _, cfg, params = load_model(tiny_checkpoints(family))
    seqs, ref = _sequences(), reference_logits(family)
    batch = StaticBatch(cfg, params, num_seqs=len(seqs), max_len=max(map(len, seqs)), page_size=page_size)
    # Prefill: a ragged batch of prompts in one step.
    logits = batch.extend([s[:n] for s, n in zip(seqs, PROMPT_LENGTHS)])
    starts = np.concatenate([[0], np.cumsum(PROMPT_LENGTHS)])
    for i, n in enumerate(PROMPT_LENGTHS):
        _assert_close(logits[starts[i]:starts[i + 1]], ref[i][:n])
    # Decode: one token per sequence per step through the paged cache.
    for step in range(NUM_DECODE_STEPS):
        logits = batch.extend([[s[n + step]] for s, n in zip(seqs, PROMPT_LENGTHS)])
        for i, n in enumerate(PROMPT_LENGTHS):
            _assert_close(logits[i], ref[i][n + step])


def test_config_flags_per_family(tiny_checkpoints):
    flags = {}
    for family in tiny_models.FAMILIES:
        _, cfg, params = load_model(tiny_checkpoints(family))
        flags[family] = (cfg.tie_word_embeddings, cfg.attention_bias, cfg.qk_norm,
                         "bqkv" in params["layers"], "q_norm" in params["layers"], cfg.rope_scaling.kind)
    assert flags["llama"] == (True, False, False, False, False, "default")
    assert flags["llama_untied"] == (False, False, False, False, False, "llama3")
    assert flags["qwen2"] == (False, True, False, True, False, "default")
    assert flags["qwen3"] == (True, False, True, False, True, "default")


def test_bfloat16_params(tiny_checkpoints, reference_logits):
    import jax.numpy as jnp

    _, cfg, params = load_model(tiny_checkpoints("llama"), dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in [params["embed"], *params["layers"].values()])
    seqs = _sequences()
    batch = StaticBatch(cfg, params, num_seqs=1, max_len=len(seqs[0]), page_size=4)
    logits = batch.extend([seqs[0]])
    ref = reference_logits("llama")[0]
    assert logits.dtype == np.float32
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9
