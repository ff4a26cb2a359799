"""Loading errors name the file and the tensor; the default model is found without importing its package."""

import json
import os
import shutil

import pytest

from kvloom.engine.config import ModelConfig
from kvloom.engine.models.loader import ModelLoadError, default_model_path, load_model, resolve_source


@pytest.fixture
def checkpoint_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints("llama_untied"), dst)
    return dst


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_missing_path():
    with pytest.raises(ModelLoadError, match="no such model file or directory"):
        load_model("/nonexistent/model")


def test_missing_config(checkpoint_copy):
    os.remove(checkpoint_copy / "config.json")
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        load_model(str(checkpoint_copy))


def test_unreadable_config(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: unreadable"):
        load_model(str(checkpoint_copy))


def test_unknown_architecture(checkpoint_copy):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError,
                       match=r"config\.json: architectures: unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(checkpoint_copy))


def test_missing_tensor(checkpoint_copy):
    _rewrite_tensors(checkpoint_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError,
                       match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(checkpoint_copy))


def test_shape_mismatch(checkpoint_copy):
    def edit(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = t[name][:, :-1].copy()

    _rewrite_tensors(checkpoint_copy, edit)
    with pytest.raises(ModelLoadError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                             r"has shape \(32, 63\), expected \(32, 64\)"):
        load_model(str(checkpoint_copy))


def test_corrupt_safetensors(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unreadable safetensors file"):
        load_model(str(checkpoint_copy))


def test_no_safetensors(checkpoint_copy):
    os.remove(checkpoint_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors files"):
        load_model(str(checkpoint_copy))


def test_not_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"1234")
    with pytest.raises(ModelLoadError, match=r"weights\.bin: not a \.gguf file"):
        load_model(str(path))


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ModelLoadError, match=r"broken\.gguf: unreadable GGUF file"):
        load_model(str(path))


def test_config_validation_names_the_field():
    good = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    assert ModelConfig.from_hf(good).num_kv_heads == 2
    with pytest.raises(ValueError, match="intermediate_size: missing"):
        ModelConfig.from_hf({k: v for k, v in good.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="num_key_value_heads: 3 does not divide"):
        ModelConfig.from_hf({**good, "num_attention_heads": 4, "num_key_value_heads": 3, "hidden_size": 8})
    with pytest.raises(ValueError, match="rope_scaling: unsupported rope_type 'yarn'"):
        ModelConfig.from_hf({**good, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_default_model_is_found():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    source = resolve_source(None)
    assert source.is_gguf and source.name == "SmolLM2-135M-Instruct"


def test_gguf_weights_equal_the_checkpoint(tiny_checkpoints, tmp_path):
    import numpy as np

    from tests import tiny_models

    checkpoint = tiny_checkpoints("llama_untied")
    path = tiny_models.build_gguf(str(tmp_path / "tiny.gguf"), checkpoint)
    _, want_cfg, want = load_model(checkpoint)
    source, cfg, got = load_model(path)
    assert source.is_gguf and source.name == "tiny"
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "tie_word_embeddings", "eos_token_ids"):
        assert getattr(cfg, field) == getattr(want_cfg, field), field
    import jax

    want_leaves, got_leaves = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)
    assert len(want_leaves) == len(got_leaves)
    for (key, a), b in zip(want_leaves, got_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_weights_are_kept_converted_and_read_back(tiny_checkpoints, tmp_path, monkeypatch, caplog,
                                                       dtype):
    import jax
    import numpy as np

    from kvloom.engine.models import loader
    from tests import tiny_models

    path = tiny_models.build_gguf(str(tmp_path / "tiny.gguf"), tiny_checkpoints("llama_untied"))
    cache = str(tmp_path / "weights")
    _, want_cfg, want = load_model(path, dtype)
    _, cfg, first = load_model(path, dtype, cache_dir=cache)
    assert len(os.listdir(cache)) == 1  # one entry for the file and dtype

    opened = []
    real_open = loader._open_gguf
    monkeypatch.setattr(loader, "_open_gguf", lambda p: opened.append(p) or real_open(p))
    _, cached_cfg, cached = load_model(path, dtype, cache_dir=cache)
    assert opened == [] and cached_cfg == want_cfg == cfg  # read back: the GGUF file was not parsed
    want_leaves, got_leaves = jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(cached)
    assert len(want_leaves) == len(got_leaves)
    for (key, a), b in zip(want_leaves, got_leaves):
        assert a.dtype == b.dtype == np.dtype(jax.numpy.dtype(dtype)), jax.tree_util.keystr(key)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))

    os.utime(path, ns=(0, 0))  # the file changed: converted again, the entry replaced
    load_model(path, dtype, cache_dir=cache)
    assert opened == [path] and len(os.listdir(cache)) == 1

    entry = os.path.join(cache, os.listdir(cache)[0])
    with open(entry, "r+b") as f:  # a truncated entry is converted again, with a warning
        f.truncate(100)
    _, _, again = load_model(path, dtype, cache_dir=cache)
    assert opened == [path, path] and "ignoring unreadable converted weights" in caplog.text
    np.testing.assert_array_equal(np.asarray(again["embed"]), np.asarray(want["embed"]))
