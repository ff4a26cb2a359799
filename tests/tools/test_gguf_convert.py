"""tools.gguf_convert: the float GGUF llama.cpp runs, read back by kvloom's own loader."""

import gguf
import jax
import numpy as np
import pytest

from kvloom.engine.models.loader import _unpermute_rope, load_model, resolve_source
from kvloom.tools import compare_report, gguf_convert, peers

pytestmark = pytest.mark.timeout(180)


def test_rope_permutation_inverts_the_loader():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    assert np.array_equal(_unpermute_rope(gguf_convert.permute_rope(weight, 4), 4), weight)


def _leaves(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _quantize_q4_1(src: str, out: str) -> None:
    """A Q4_1 copy of a float GGUF (2-d tensors quantized, metadata copied)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    for tensor in reader.tensors:
        array = np.asarray(tensor.data, np.float32)
        if array.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, q4_1), raw_dtype=q4_1)
        else:
            writer.add_tensor(tensor.name, array)
    gguf_convert._write(writer)


def test_float_gguf_from_a_checkpoint_and_from_a_quantized_gguf(tiny_llama, tmp_path, monkeypatch):
    from kvloom.engine.config import CACHE_DIR_ENV
    from kvloom.engine.tokenizer import Tokenizer

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "kvloom-cache"))  # the GGUF tokenizer's cache
    source = resolve_source(tiny_llama)
    f32 = gguf_convert.float_gguf(source, "f32", str(tmp_path / "cache"))
    assert gguf_convert.float_gguf(source, "f32", str(tmp_path / "cache")) == f32  # converted once
    _, cfg, params = load_model(tiny_llama)
    _, cfg_f32, params_f32 = load_model(f32)
    assert cfg_f32.num_heads == cfg.num_heads and cfg_f32.vocab_size == cfg.vocab_size
    assert cfg_f32.tie_word_embeddings and cfg_f32.eos_token_ids == cfg.eos_token_ids
    want, got = _leaves(params), _leaves(params_f32)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    text = "The quick brown fox jumps over the lazy dog."
    assert (Tokenizer.load(resolve_source(f32)).encode(text, add_special_tokens=False)
            == Tokenizer.load(source).encode(text, add_special_tokens=False))

    q4 = str(tmp_path / "tiny.Q4_1.gguf")
    _quantize_q4_1(f32, q4)
    assert gguf_convert.gguf_file_type_name(q4) == "Q4_1"
    f16 = gguf_convert.float_gguf(resolve_source(q4), "f16", str(tmp_path / "cache"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(f16).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _, _, params_q4 = load_model(q4)
    _, _, params_f16 = load_model(f16)
    dequantized, converted = _leaves(params_q4), _leaves(params_f16)
    assert all(np.allclose(dequantized[k], converted[k], rtol=1e-3, atol=1e-3) for k in dequantized)

    # a conversion that fails falls back to the original file, labelled honestly
    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fail)
    model_files = peers.LlamaCppModelFiles(resolve_source(q4), str(tmp_path / "other"))
    path, tag, note = model_files.get("f32")
    assert path == q4 and tag == "(Q4_1)" and "disk full" in note
    assert compare_report.peer_label("llamacpp:f32", tag) == "llama.cpp (Q4_1)"
    assert model_files.get("f32") == (path, tag, note)  # made once
    assert model_files.get("original") == (q4, "(Q4_1)", None)
