"""The real default model (SmolLM2-135M-Instruct, GGUF): greedy tokens equal transformers' on the same
weights."""

import os

import pytest
import torch

from kvloom.engine.models.loader import load_model, resolve_source
from kvloom.engine.offline import greedy_generate

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
NUM_TOKENS = 32


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_greedy_tokens_match_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(None)
    gguf_file = os.path.basename(source.path)
    tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=gguf_file)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True)
               for p in PROMPTS]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]

    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=gguf_file,
                                              dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            # The attention mask is explicit: the pad id (2) also closes each chat turn, and generate
            # would otherwise mask those prompt tokens out.
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS,
                              do_sample=False,
                              eos_token_id=None, pad_token_id=tok.eos_token_id)
            expected.append(out[0, len(ids):].tolist())
    del hf

    _, cfg, params = load_model(None)
    ours = greedy_generate(cfg, params, prompts, NUM_TOKENS, page_size=16)
    for prompt, want, got in zip(PROMPTS, expected, ours):
        assert got == want, f"{prompt!r}: {tok.decode(got)!r} != {tok.decode(want)!r}"
    assert "Paris" in tok.decode(ours[0])
