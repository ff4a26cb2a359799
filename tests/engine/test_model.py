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
def test_prefill_and_decode_match_transformers(tiny_checkpoints, reference_logits, family, page_size,
                                               kernel=None):
    _, cfg, params = load_model(tiny_checkpoints(family))
    seqs, ref = _sequences(), reference_logits(family)
    batch = StaticBatch(cfg, params, num_seqs=len(seqs), max_len=max(map(len, seqs)), page_size=page_size,
                        kernel=kernel)
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


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_steps_with_the_cpu_kernels_match_transformers(tiny_checkpoints, reference_logits, family):
    from kvloom.engine.config import cache_root
    from kvloom.kernels import cpu_kernels

    if cpu_kernels.unavailable_reason() is not None:
        pytest.skip(f"the CPU kernel cannot run here: {cpu_kernels.unavailable_reason()}")
    kernel = cpu_kernels.load(f"{cache_root()}/kernels")
    test_prefill_and_decode_match_transformers(tiny_checkpoints, reference_logits, family, 4, kernel)


def test_config_flags_per_family(tiny_checkpoints):
    flags = {}
    for family in tiny_models.FAMILIES:
        _, cfg, params = load_model(tiny_checkpoints(family))
        layer = params["layers"][0]
        flags[family] = (cfg.tie_word_embeddings, cfg.attention_bias, cfg.qk_norm,
                         "bqkv" in layer, "q_norm" in layer, cfg.rope_scaling.kind)
    assert flags["llama"] == (True, False, False, False, False, "default")
    assert flags["llama_untied"] == (False, False, False, False, False, "llama3")
    assert flags["qwen2"] == (False, True, False, True, False, "default")
    assert flags["qwen3"] == (True, False, True, False, True, "default")


def test_bfloat16_params(tiny_checkpoints, reference_logits):
    import jax.numpy as jnp

    _, cfg, params = load_model(tiny_checkpoints("llama"), dtype="bfloat16")
    layer_leaves = [w for layer in params["layers"] for w in layer.values()]
    assert all(leaf.dtype == jnp.bfloat16 for leaf in [params["embed"], *layer_leaves])
    seqs = _sequences()
    batch = StaticBatch(cfg, params, num_seqs=1, max_len=len(seqs[0]), page_size=4)
    logits = batch.extend([seqs[0]])
    ref = reference_logits("llama")[0]
    assert logits.dtype == np.float32
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("family, layers_per_call", [("llama", 1), ("llama", 2), ("qwen2", 2), ("qwen3", 1)])
def test_layered_forward_equals_the_one_program_forward(tiny_checkpoints, family, layers_per_call):
    """engine.forward runs the model as pieces compiled apart, one layer or a group of layers per call;
    llama.forward composes the same functions in one trace. Same logits, hidden states and KV cache, for
    a ragged prefill and then a decode step."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from kvloom.engine.forward import LayeredForward
    from kvloom.engine.models import llama

    _, cfg, params = load_model(tiny_checkpoints(family))
    page_size, width = 4, 8
    one_program = jax.jit(partial(llama.forward, cfg=cfg, page_size=page_size))
    layered = LayeredForward.jitted(cfg, page_size, layers_per_call=layers_per_call)
    kv_a = llama.init_kv_cache(cfg, 1 + 2 * width, page_size, jnp.float32)
    kv_b = llama.init_kv_cache(cfg, 1 + 2 * width, page_size, jnp.float32)
    table = (1 + np.arange(2 * width, dtype=np.int32)).reshape(2, width)
    rng = np.random.default_rng(1)
    for past, new in (([0, 0], [7, 3]), ([7, 3], [1, 1])):
        qn = max(new)
        ids = np.zeros((2, qn), np.int32)
        pos = np.zeros((2, qn), np.int32)
        slots = np.zeros((2, qn), np.int32)
        for r in range(2):
            p = past[r] + np.arange(new[r])
            ids[r, :new[r]] = rng.integers(3, tiny_models.VOCAB_SIZE, new[r])
            pos[r, :new[r]] = p
            slots[r, :new[r]] = table[r, p // page_size] * page_size + p % page_size
        step = llama.StepInput(ids.reshape(-1), pos.reshape(-1), slots.reshape(-1),
                               np.array([new[0] - 1, qn + new[1] - 1], np.int32),
                               (llama.Segment(table, np.array(past, np.int32), np.array(new, np.int32), qn),))
        hidden_a, kv_a = one_program(params, kv_a, step)
        logits_a = llama.logits_from_hidden(params, hidden_a[step.logits_indices], cfg=cfg)
        logits_b, hidden_b, kv_b = layered(params, kv_b, step)
        np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(hidden_b), np.asarray(hidden_a), rtol=1e-5, atol=1e-5)
        for a, b in zip(kv_a, kv_b):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_layers_per_call_divides_the_layer_count():
    """Every call runs the same number of layers (one executable per step shape): the largest divisor of
    the layer count up to the setting; 0 picks the default; a group that does not divide is refused."""
    from kvloom.engine.config import AUTO_LAYERS_PER_CALL, ConfigError, EngineConfig
    from kvloom.engine.forward import LayeredForward

    per_call = [EngineConfig(layers_per_call=k).layers_per_call_for(30) for k in (1, 4, 5, 7, 100)]
    assert per_call == [1, 3, 5, 6, 30]
    auto = EngineConfig(layers_per_call=AUTO_LAYERS_PER_CALL)
    assert [EngineConfig().layers_per_call_for(n) for n in (1, 2, 7, 28, 30)] == [
        auto.layers_per_call_for(n) for n in (1, 2, 7, 28, 30)]
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="layers_per_call"):
            EngineConfig(layers_per_call=bad)
    forward = LayeredForward(None, None, None, mesh=_one_device_mesh(), layers_per_call=4)
    with pytest.raises(ValueError, match="does not divide the model's 30 layers"):
        forward._groups({"layers": [{}] * 30})
    assert [first for first, _ in LayeredForward(None, None, None, _one_device_mesh(), layers_per_call=3)
            ._groups({"layers": [{}] * 6})] == [0, 3]


def _one_device_mesh():
    from kvloom.engine import sharding

    return sharding.make_mesh(1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_write_puts_each_layers_tokens_at_their_slots(dtype):
    """write_kv_cache against a plain numpy write: every layer's token t lands at slot_mapping[t] of that
    layer, in the cache's storage dtype; other slots keep their values; padding tokens all write slot 0."""
    import jax.numpy as jnp

    from kvloom.engine.models import llama
    from kvloom.kernels.kv_format import storage_dtype, to_storage

    rng = np.random.default_rng(0)
    layers, slots, kvh, d = 3, 40, 2, 4
    storage = storage_dtype(dtype)
    k0 = rng.standard_normal((layers, slots, kvh, d)).astype(np.float32)
    v0 = rng.standard_normal((layers, slots, kvh, d)).astype(np.float32)
    slot_mapping = np.array([7, 8, 9, 33, 0, 0], np.int32)  # two rows' tokens, then two padding tokens
    new_k = [rng.standard_normal((6, kvh, d)).astype(np.float32) for _ in range(layers)]
    new_v = [rng.standard_normal((6, kvh, d)).astype(np.float32) for _ in range(layers)]
    as_storage = lambda a: to_storage(jnp.asarray(a), storage)  # noqa: E731 - bfloat16: its 16-bit patterns
    k, v = llama.write_kv_cache((as_storage(k0), as_storage(v0)), [as_storage(x) for x in new_k],
                                [as_storage(x) for x in new_v], jnp.asarray(slot_mapping))
    for got, before, new in ((k, k0, new_k), (v, v0, new_v)):
        want = np.asarray(as_storage(before)).copy()
        for layer in range(layers):
            want[layer, slot_mapping[:4]] = np.asarray(as_storage(new[layer]))[:4]
        got = np.asarray(got)
        assert got.dtype == want.dtype
        keep = np.setdiff1d(np.arange(slots), slot_mapping)
        np.testing.assert_array_equal(got[:, keep], want[:, keep])
        np.testing.assert_array_equal(got[:, slot_mapping[:4]], want[:, slot_mapping[:4]])


@pytest.mark.parametrize("rows", [1, 8, 40])  # decode-sized products as W x^T, longer ones as x W^T
def test_linear_multiplies_by_the_weight_stored_output_axes_first(rows):
    import jax

    from kvloom.engine.models import llama

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 16), dtype=np.float32)
    w = rng.standard_normal((12, 2, 16), dtype=np.float32)  # [*out, in], as fuse_params lays out gate/up
    got = np.asarray(jax.jit(llama.linear)(x, w))
    assert got.shape == (rows, 12, 2)
    np.testing.assert_allclose(got, np.einsum("tk,nck->tnc", x, w), rtol=1e-5, atol=1e-5)


def test_products_run_without_copying_the_weight():
    """A decode-sized product keeps the weight as its long side ([64, 8]: XLA would fold the transpose
    back into an [8, K] x [K, 64] dot, the slower CPU form); a longer one reads the weight in place
    (XLA copies a weight whose output axes it cannot merge into another layout, every step)."""
    import jax

    from kvloom.engine.models import llama

    w = np.ones((32, 2, 16), np.float32)
    for rows, product in ((8, "f32[64,8]"), (40, "f32[40,64]")):
        hlo = jax.jit(llama.linear).lower(np.ones((rows, 16), np.float32), w).compile().as_text()
        dots = [line for line in hlo.splitlines() if " dot(" in line]
        assert dots and all(product in line for line in dots), dots
        entry = hlo.split("ENTRY")[1].splitlines()
        weight = next(line.split(" = ")[0].strip() for line in entry if "parameter(1)" in line)
        readers = [line for line in entry if f"({weight}" in line or f", {weight}" in line]
        assert all(" bitcast(" in line or "kind=kCustom" in line for line in readers), readers


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_bfloat16_weights_multiply_rounded_activations_in_float32(rows):
    """The product is bf16 x bf16 accumulated in float32 with a float32 result (the form XLA's CPU dot
    runs natively); one row included."""
    import jax
    import jax.numpy as jnp

    from kvloom.engine.models import llama

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 16), dtype=np.float32)
    w = jnp.asarray(rng.standard_normal((12, 2, 16), dtype=np.float32), jnp.bfloat16)
    fn = jax.jit(llama.linear)
    got = fn(x, w)
    assert got.dtype == jnp.float32 and got.shape == (rows, 12, 2)
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    want = np.einsum("tk,nck->tnc", x_rounded, np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    hlo = fn.lower(x, w).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and all(line.split(" = ")[1].startswith("f32[") for line in dots), dots
    assert "f32[24,16]" not in hlo  # the weight is never converted to float32 (a copy per step)
