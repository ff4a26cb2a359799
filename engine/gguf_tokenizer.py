"""A GGUF file's tokenizer, built from its metadata with `gguf` and `tokenizers` alone (no PyTorch).

A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, each token's type,
the special token ids, the BOS/EOS flags and the chat template as metadata. This module reads those
keys and assembles the same tokenizer transformers' own GGUF converter builds (the tests hold the two
equal on a corpus of mixed text), wrapped in a `PreTrainedTokenizerFast`:

    metadata = read_tokenizer_metadata(path)     # tokenizer.* keys of the file
    hf_tokenizer = build_tokenizer(metadata)     # vocabulary, merges, special tokens, template

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, Qwen2) are built
here. Other vocabularies raise `UnsupportedGGUFTokenizer`; the caller may then fall back to
transformers' converter, which needs PyTorch.
"""

from __future__ import annotations

from typing import Any, Optional

TOKEN_TYPE_CONTROL = 3  # llama.cpp's token types: 3 marks a special token, 4 a user-defined added token
TOKEN_TYPE_USER_DEFINED = 4

# How text is split into words before BPE, by `tokenizer.ggml.pre` (llama.cpp's names). A name not
# listed keeps the GPT-2 split of the ByteLevel pre-tokenizer, as transformers' converter does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class UnsupportedGGUFTokenizer(ValueError):
    """The file's vocabulary is of a kind this module does not build."""


def read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The file's `tokenizer.*` metadata, as plain Python values."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def build_tokenizer(metadata: dict[str, Any]):
    """A `PreTrainedTokenizerFast` from GGUF tokenizer metadata (see `read_tokenizer_metadata`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUFTokenizer(f"tokenizer.ggml.model: {kind!r} is not a byte-level BPE vocabulary")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or ())
    spelling = byte_level_alphabet()
    alphabet = set(spelling.values())
    # Every token in the byte alphabet's spelling; a few files store some in plain UTF-8.
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges") or ()]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()

    # Control tokens are special; one spelled outside the byte alphabet is a mislabel llama.cpp makes,
    # and adding it would grow the vocabulary past the model's, so it is skipped (as transformers does).
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_CONTROL and set(token) <= alphabet])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types) if kind == TOKEN_TYPE_USER_DEFINED and token in vocab])

    def special(key: str) -> Optional[str]:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(bos, vocab[bos])] * add_bos + [(eos, vocab[eos])] * add_eos)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"), chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=add_bos, add_eos_token=add_eos)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE spells its tokens in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
