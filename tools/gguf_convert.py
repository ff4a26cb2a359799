"""A model as a float GGUF, the file llama.cpp runs when kvloom compare sets it beside kvloom.

    float_gguf(source, dtype, cache_dir) -> path: converted once per source file and dtype ("f32"
        or "f16"), kept in cache_dir under a fingerprint of the source
    convert_gguf: a quantized GGUF dequantized tensor by tensor, metadata copied verbatim
    convert_hf_dir: a plain Llama safetensors directory with a byte-level BPE tokenizer
    gguf_file_type_name: "Q4_1" and the like, for labels

ConversionError names why a model cannot be converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

CONVERTER_VERSION = 1  # part of the converted file's cache key


class ConversionError(Exception):
    """The model cannot be written as a float GGUF; the message names the reason."""


def _float_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """F16 files keep 1-d tensors (norms) in F32, as llama.cpp's own converter does."""
    return array.astype(np.float16 if dtype == "f16" and array.ndim > 1 else np.float32)


def _file_type(dtype: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert_gguf(path: str, out: str, dtype: str) -> None:
    """A quantized GGUF -> the same file with every tensor dequantized to `dtype` ("f32"/"f16"):
    metadata (tokenizer included) copied verbatim, tensor names and layouts unchanged."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
                "general.architecture", "general.file_type", "general.quantization_version"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(_file_type(dtype))
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)  # numpy layout: reversed ggml dims
        writer.add_tensor(tensor.name, _float_array(np.asarray(array, np.float32), dtype))
    _write(writer)


def permute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF q/k rows (two halves per head) -> llama.cpp's interleaved rows; the inverse of the loader's
    _unpermute_rope."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_hf_dir(path: str, out: str, dtype: str) -> None:
    """A Llama checkpoint directory with a byte-level BPE tokenizer -> a float GGUF (gguf-py's writer)."""
    from pathlib import Path

    import gguf
    from safetensors import safe_open

    from kvloom.engine.config import ConfigError, ModelConfig
    from kvloom.engine.models.loader import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except (OSError, ValueError, ConfigError) as exc:
        raise ConversionError(f"config.json: {exc}") from None
    if cfg.architecture != "LlamaForCausalLM" or cfg.rope_scaling.kind != "default" or cfg.attention_bias:
        raise ConversionError(f"{cfg.architecture} with rope {cfg.rope_scaling.kind}: only plain Llama "
                              "checkpoint directories are converted here")
    try:
        vocab = gguf.BpeVocab(Path(path))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConversionError(f"tokenizer: not a byte-level BPE tokenizer.json ({exc})") from None
    tokens, token_types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text)
        token_types.append(token_type)
    for i in range(len(tokens), cfg.vocab_size):  # embedding rows past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        token_types.append(gguf.TokenType.UNUSED)

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(os.path.basename(path.rstrip(os.sep)))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(dtype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(Path(path), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    hf_to_gguf = {hf: name for name, hf in GGUF_GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        hf_to_gguf.update({f"model.layers.{i}.{hf}": f"blk.{i}.{name}"
                           for name, hf in GGUF_LAYER_NAMES.items()})
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{path}: no *.safetensors files")
    written = set()
    for file in files:
        handle = safe_open(os.path.join(path, file), framework="flax")
        for key in sorted(handle.keys()):
            name = hf_to_gguf.get(key)
            if name is None:  # rotary buffers and the like
                continue
            array = np.asarray(handle.get_tensor(key).astype("float32"))
            if key.endswith("self_attn.q_proj.weight"):
                array = permute_rope(array, cfg.num_heads)
            elif key.endswith("self_attn.k_proj.weight"):
                array = permute_rope(array, cfg.num_kv_heads)
            writer.add_tensor(name, _float_array(array, dtype))
            written.add(name)
    if cfg.tie_word_embeddings:
        written.add("output.weight")
    missing = sorted(set(hf_to_gguf.values()) - written)
    if missing:
        raise ConversionError(f"{path}: missing tensors for {', '.join(missing[:3])}")
    _write(writer)


def _fingerprint(path: str) -> str:
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns)
             for f in files if os.path.isfile(f)]
    return hashlib.sha256(repr((os.path.abspath(path), stats, CONVERTER_VERSION)).encode()).hexdigest()[:16]


def float_gguf(source, dtype: str, cache_dir: str) -> str:
    """The model as a GGUF of `dtype` ("f32"/"f16") tensors, converted once into cache_dir."""
    name = f"{source.name}-{_fingerprint(source.path)}.{dtype}.gguf"
    out = os.path.join(os.path.expanduser(cache_dir), name)
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    partial = f"{out}.partial-{os.getpid()}"
    print(f"kvloom: converting {source.path} to an {dtype.upper()} GGUF", file=sys.stderr, flush=True)
    try:
        (convert_gguf if source.is_gguf else convert_hf_dir)(source.path, partial, dtype)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out


def gguf_file_type_name(path: str) -> str:
    """"Q4_1" for a MOSTLY_Q4_1 file; "GGUF" when the file does not say."""
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("general.file_type")
        name = gguf.LlamaFileType(int(field.contents())).name if field is not None else "GGUF"
    except Exception:  # noqa: BLE001 - a label only
        return "GGUF"
    return name.replace("MOSTLY_", "").replace("ALL_", "")
