"""tools.random_checkpoint: the tiny Qwen3 shape written with numpy loads in kvloom, which generates
transformers' greedy tokens from it (so the tensors are HF's names and layout), and the named shapes."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from kvloom.engine.engine import Engine
from kvloom.engine.request import SamplingParams
from kvloom.tools import random_checkpoint
from tests import tiny_models
from tests.conftest import tiny_engine_config

NUM_TOKENS = 6


def test_qwen3_0_6b_shape_is_qwen3_0_6b():
    family, overrides = random_checkpoint.SHAPES["qwen3-0.6b"]
    config = random_checkpoint.hf_config(family, **overrides)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.intermediate_size,
            config.vocab_size) == (1024, 28, 16, 8, 128, 3072, 151936)
    assert config.tie_word_embeddings and config.model_type == "qwen3"


@pytest.mark.timeout(240)
async def test_tiny_checkpoint_loads_and_generates(tmp_path):
    family, overrides = random_checkpoint.SHAPES["tiny"]
    path = random_checkpoint.build_random_checkpoint(str(tmp_path / "tiny"), family, std=0.08, **overrides)
    with open(tmp_path / "tiny" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen3ForCausalLM"]

    prompt = "Hello world! How are you today?"
    hf = tiny_models.load_hf(path)  # transformers reads every tensor it expects
    hf_ids = AutoTokenizer.from_pretrained(path)(prompt)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([hf_ids])
        expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(hf_ids):].tolist()

    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    async with Engine(tiny_engine_config(path, warmup=False)) as engine:
        assert engine.is_ready, engine.state_detail
        assert engine.runner.vocab_size == overrides["vocab_size"]
        ids = []
        async for out in engine.generate(prompt, params):
            assert out.error is None
            ids += out.token_ids
    assert ids == expected
    assert all(0 <= t < overrides["vocab_size"] for t in ids)
