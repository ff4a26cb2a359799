"""Random-weight Hugging Face checkpoints of any supported shape, written without PyTorch.

    build_tokenizer(path)                  a small byte-level BPE tokenizer (384 ids, trained here on a
                                           fixed corpus) with a ChatML template
    hf_config(family, **overrides)         the transformers config of a family ("llama", "llama_untied",
                                           "qwen2", "qwen3"), tiny unless overrides say otherwise
    build_random_checkpoint(path, family, ...)
                                           config.json + model.safetensors (float32, drawn with numpy)
                                           + the tokenizer: a directory `kvloom serve --model` loads
    SHAPES                                 named shapes: "qwen3-0.6b" (Qwen3-0.6B's config values) and
                                           "tiny" (the same family, a few layers, a small vocabulary)

The tensors are the ones kvloom's loader asks for (engine.models.llama's weight tables), in Hugging
Face's layout, so transformers loads the directory too. The tokenizer may know fewer ids than the model's
vocabulary (as Qwen3's padded vocabulary does): every token id stays < vocab_size. Nothing downloads;
the tests' tiny checkpoints (tests/tiny_models.py) share the tokenizer and the configs.

    python -m kvloom.tools.random_checkpoint DIR [--shape qwen3-0.6b|tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "kvloom serves language models from Python with JAX on one event loop.",
    "Scoring ranks items for a query; generation writes text one token at a time.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols , . ; : ! ? ( ) [ ] { } - + * /",
    "Once upon a time there was a small model that learned to count and to rhyme.",
] * 4

FAMILIES = ("llama", "llama_untied", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "llama_untied": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
VOCAB_SIZE = 384  # the tokenizer's ids, and the tiny configs' vocabulary

# Qwen3-0.6B's config.json values (tie_word_embeddings, qk-norm and rope_theta 1e6 are the family's).
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rms_norm_eps=1e-6)
# The same family on a CPU in seconds; the vocabulary is wider than the tokenizer, as Qwen3's is.
TINY_QWEN3 = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
SHAPES = {"qwen3-0.6b": ("qwen3", QWEN3_0_6B), "tiny": ("qwen3", TINY_QWEN3)}


def build_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def hf_config(family: str, **overrides):
    """A tiny config of `family` (the tokenizer's special ids: bos/pad 0, eos 2); overrides win."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    values = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        cls = LlamaConfig
        values.update(tie_word_embeddings=True, rope_theta=10000.0)
    elif family == "llama_untied":
        cls = LlamaConfig
        values.update(tie_word_embeddings=False, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen2":
        cls = Qwen2Config
        values.update(tie_word_embeddings=False, rope_theta=1000000.0)
    elif family == "qwen3":
        cls = Qwen3Config
        values.update(tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)
    else:
        raise ValueError(f"unknown family {family!r}")
    values.update(overrides)
    return cls(**values)


def random_tensors(hf: dict, rng: np.random.Generator, std: float) -> dict[str, np.ndarray]:
    """HF name -> float32 array for the tensors kvloom's loader reads from a config.json dict `hf`:
    matrices normal(0, std), norm weights ones, biases zeros."""
    from kvloom.engine.config import ModelConfig
    from kvloom.engine.models import llama

    cfg = ModelConfig.from_hf(hf)
    shapes = llama.expected_shapes(cfg)

    def tensor(name: str, key: str) -> np.ndarray:
        shape = shapes[key]
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        array = rng.standard_normal(shape, dtype=np.float32)
        array *= std
        return array

    tensors = {name: tensor(name, key) for name, key in llama.global_weight_names(cfg).items()}
    for i in range(cfg.num_layers):
        for suffix, key in llama.layer_weight_names(cfg).items():
            name = f"model.layers.{i}.{suffix}"
            tensors[name] = tensor(name, key)
    return tensors


def build_random_checkpoint(path: str, family: str = "qwen3", *, seed: int = 0, std: float = 0.02,
                            **overrides) -> str:
    """Write a random checkpoint of `family` (hf_config's tiny shape with `overrides`) to `path` and
    return the path."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    config = hf_config(family, **overrides)
    config.architectures = [ARCHITECTURES[family]]
    config.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    tensors = random_tensors(hf, np.random.default_rng(seed), std)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(path)
    return path


def build_shape(path: str, shape: str, seed: int = 0) -> str:
    """build_random_checkpoint of a named shape (SHAPES)."""
    family, overrides = SHAPES[shape]
    return build_random_checkpoint(path, family, seed=seed, **overrides)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the checkpoint directory to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_shape(args.path, args.shape, args.seed))


if __name__ == "__main__":
    main()
