"""Tiny random-weight checkpoints of each supported family, built with transformers.

A checkpoint directory holds config.json, model.safetensors and the small byte-level BPE tokenizer
with a ChatML template of tools/random_checkpoint.py (which also holds the families' configs), so every
test runs with no download. The weights come from transformers' own model classes, so HF loads them
as a reference.
"""

from __future__ import annotations

import os

from kvloom.tools.random_checkpoint import (  # noqa: F401 - FAMILIES, VOCAB_SIZE: for the tests
    CHAT_TEMPLATE, FAMILIES, VOCAB_SIZE, build_tokenizer, hf_config)


def build_checkpoint(path: str, family: str, seed: int = 0, **overrides) -> str:
    """Write a tiny random checkpoint of `family` to `path` and return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so logits spread out
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(path)
    return path


def load_hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def build_gguf(path: str, checkpoint: str, *, add_bos_token: bool = False, pre: str = "smollm") -> str:
    """Write a tiny checkpoint (a "llama" or "llama_untied" family directory) as a GGUF file the way
    llama.cpp's converter lays it out: tokenizer metadata, F32 tensors under GGUF names, q/k rows
    permuted for llama.cpp's rope. Returns `path`."""
    import json

    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(checkpoint, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(checkpoint, "tokenizer.json")) as f:
        tok = json.load(f)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])

    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(specials["<|im_start|>"])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_unk_token_id(specials["<|endoftext|>"])
    writer.add_pad_token_id(specials["<|endoftext|>"])
    writer.add_add_bos_token(add_bos_token)
    writer.add_chat_template(CHAT_TEMPLATE)

    def permute(w, n_head):  # llama.cpp's order of q/k rows (the loader undoes it)
        rows = w.shape[0] // n_head // 2
        return w.reshape(n_head, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                   "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, array in load_file(os.path.join(checkpoint, "model.safetensors")).items():
        if name in names:
            writer.add_tensor(names[name], array.astype("float32"))
            continue
        _, _, layer, rest = name.split(".", 3)
        module = rest[: -len(".weight")]
        if module == "self_attn.q_proj":
            array = permute(array, heads)
        elif module == "self_attn.k_proj":
            array = permute(array, kv_heads)
        writer.add_tensor(f"blk.{layer}.{layer_names[module]}.weight", array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
