"""Load a model from a Hugging Face checkpoint directory or a GGUF file.

Both paths end in the same place: a `ModelConfig` and a params pytree in
kvloom's layout (see `engine/models/llama.py`), per-layer leaves stacked on a
leading layer axis. Every failure raises `ModelLoadError` naming the file and,
where there is one, the tensor.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from kvloom.engine.config import ConfigError, ModelConfig
from kvloom.engine.models import llama, weights_cache
from kvloom.engine.models.source import (  # noqa: F401 - re-exported: the loader's public names
    DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE, ModelLoadError, ModelSource,
    default_model_path, resolve_source)


def load_model(model: Optional[str], dtype: str = "float32", cache_dir: Optional[str] = None):
    """Returns (source, ModelConfig, params) with params as JAX arrays of `dtype`. With `cache_dir`, a
    GGUF file's converted weights are kept there and read back by the next load
    (engine.models.weights_cache)."""
    source = resolve_source(model)
    if source.is_gguf and cache_dir:
        cached = weights_cache.load(cache_dir, source, dtype)
        if cached is not None:
            return source, *cached
    if source.is_gguf:
        cfg, tensors = _open_gguf(source.path)
    else:
        cfg, tensors = _open_hf_dir(source.path)
    params = _assemble(cfg, tensors, dtype)
    if source.is_gguf and cache_dir:
        weights_cache.store(cache_dir, source, dtype, cfg, params)
    return source, cfg, params


# A tensor source: HF name -> a loader returning (numpy array [HF layout], file it came from).
TensorTable = dict[str, tuple[Callable[[], np.ndarray], str]]


def _assemble(cfg: ModelConfig, tensors: TensorTable, dtype: str):
    import jax.numpy as jnp

    shapes = llama.expected_shapes(cfg)
    target = jnp.dtype(dtype)

    def fetch(hf_name: str, key: str) -> np.ndarray:
        if hf_name not in tensors:
            files = sorted({f for _, f in tensors.values()}) or ["(no tensor files)"]
            raise ModelLoadError(f"{', '.join(files)}: missing tensor {hf_name!r}")
        load, file = tensors[hf_name]
        try:
            array = load()
        except Exception as exc:  # unreadable or corrupt data
            raise ModelLoadError(f"{file}: cannot read tensor {hf_name!r}: {exc}") from exc
        if tuple(array.shape) != shapes[key]:
            raise ModelLoadError(f"{file}: tensor {hf_name!r} has shape {tuple(array.shape)}, "
                                 f"expected {shapes[key]}")
        return array

    params = {}
    for hf_name, key in llama.global_weight_names(cfg).items():
        params[key] = jnp.asarray(fetch(hf_name, key), dtype=target)
    names = llama.layer_weight_names(cfg).items()
    params["layers"] = tuple(
        {key: jnp.asarray(fetch(f"model.layers.{i}.{suffix}", key), dtype=target) for suffix, key in names}
        for i in range(cfg.num_layers))
    return llama.fuse_params(params, cfg)


def _open_hf_dir(path: str) -> tuple[ModelConfig, TensorTable]:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, "rb") as f:
            hf_config = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{config_path}: missing (a checkpoint directory needs config.json)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: unreadable: {exc}") from exc
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except ConfigError as exc:
        raise ModelLoadError(f"{config_path}: {exc}") from exc
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files in the checkpoint directory")
    from safetensors import safe_open

    tensors: TensorTable = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            handle = safe_open(file, framework="flax")
            keys = list(handle.keys())
        except Exception as exc:
            raise ModelLoadError(f"{file}: unreadable safetensors file: {exc}") from exc
        for key in keys:
            tensors[key] = (_safetensor_loader(handle, key), file)
    return cfg, tensors


def _safetensor_loader(handle, key):
    def load():
        return np.asarray(handle.get_tensor(key).astype("float32"))
    return load


# GGUF (llama.cpp) tensor names -> HF names.
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_model_config(reader, path: str) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")

    def need(suffix):
        value = _gguf_value(reader, f"llama.{suffix}")
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata 'llama.{suffix}' is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    vocab = _gguf_value(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' (scaled rope) is not supported from GGUF")
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(_gguf_value(reader, "llama.attention.head_count_kv", heads)),
            head_dim=int(_gguf_value(reader, "llama.attention.key_length", hidden // heads)),
            rms_norm_eps=float(_gguf_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_gguf_value(reader, "llama.rope.freq_base", 10000.0)),
            max_position_embeddings=int(_gguf_value(reader, "llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head for its rope; undo it (HF layout)."""
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _open_gguf(path: str) -> tuple[ModelConfig, TensorTable]:
    try:
        from gguf import GGUFReader
        reader = GGUFReader(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: unreadable GGUF file: {exc}") from exc
    cfg = gguf_model_config(reader, path)
    tensors: TensorTable = {}
    for tensor in reader.tensors:
        hf_name = _gguf_to_hf_name(tensor.name)
        if hf_name is None:
            continue
        heads = None
        if hf_name.endswith("q_proj.weight"):
            heads = cfg.num_heads
        elif hf_name.endswith("k_proj.weight"):
            heads = cfg.num_kv_heads
        tensors[hf_name] = (_gguf_loader(tensor, heads), path)
    return cfg, tensors


def _gguf_to_hf_name(name: str) -> Optional[str]:
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _gguf_loader(tensor, rope_heads: Optional[int]):
    def load():
        from gguf.quants import dequantize
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if rope_heads is not None:
            array = _unpermute_rope(array, rope_heads)
        return array
    return load

