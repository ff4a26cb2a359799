"""Tokenizer, chat template, incremental detokenizer and stop strings, on the tiny byte-level BPE
tokenizer of tests/tiny_models.py; GGUF tokenizers built without PyTorch equal transformers' on tiny GGUF
files and (slow) on the default model's."""

import json
import os
import subprocess
import sys

import pytest

from kvloom.engine.models.source import ModelSource, resolve_source
from kvloom.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from tests import tiny_models

TEXTS = [
    "Hello world! How are you today?",
    "héllo wörld ✓ 日本語 🙂",
    "🙂🙂 mixed: ÄÖÜ ß — “quotes” ½ and emoji 👍🏽 at the end 🎉",
    "   leading spaces, trailing newline\n",
    "",
]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_models.build_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Tokenizer.load(ModelSource(tiny_tokenizer_dir, False, "tiny"))


# ---- Tokenizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_vocab_size_and_eos(tok, tiny_tokenizer_dir):
    assert tok.vocab_size == tiny_models.VOCAB_SIZE
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2]
    assert tok.eos_token_ids == (2,)
    assert tok.name_or_path == tiny_tokenizer_dir
    assert tok.loaded_from_cache is False


def test_extra_eos_ids_are_deduplicated_in_order(tiny_tokenizer_dir):
    source = ModelSource(tiny_tokenizer_dir, False, "tiny")
    tok = Tokenizer.load(source, extra_eos_ids=[0, 2, 1, 0])
    assert tok.eos_token_ids == (2, 0, 1)
    with pytest.raises(ValueError, match=r"^extra_eos_ids\[0\]"):
        Tokenizer.load(source, extra_eos_ids=[tiny_models.VOCAB_SIZE])


def test_decode_skips_special_tokens_by_default(tok):
    ids = [1] + tok.encode("Hello", add_special_tokens=False) + [2]
    assert tok.decode(ids) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"


def test_token_text_and_bytes(tok):
    ids = tok.encode("Hello 日本", add_special_tokens=False)
    assert "".join(tok.token_text(i) for i in ids[:2]) in "Hello 日本"
    # token bytes are the true bytes, even for tokens that hold part of a character
    assert b"".join(bytes(tok.token_bytes(i)) for i in ids) == "Hello 日本".encode()
    assert tok.token_text(2) == "<|im_end|>"
    assert tok.token_bytes(2) == list(b"<|im_end|>")
    with pytest.raises(ValueError):
        tok.token_text(tok.vocab_size)


# ---- chat template ---------------------------------------------------------------------------------


def test_chat_template_renders_chatml(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
    ]
    ids = tok.apply_chat_template(messages)
    assert ids[0] == 1 and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello\nworld<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(no_prompt, skip_special_tokens=False).endswith("world<|im_end|>\n")


@pytest.mark.parametrize("messages, field", [
    (None, "messages: must be a non-empty list"),
    ([], "messages: must be a non-empty list"),
    ({"role": "user", "content": "hi"}, "messages: must be a non-empty list"),
    (["hi"], "messages[0]: "),
    ([{"content": "hi"}], "messages[0].role: "),
    ([{"role": "robot", "content": "hi"}], "messages[0].role: "),
    ([{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}], "messages[1].role: "),
    ([{"role": "user"}], "messages[0].content: "),
    ([{"role": "user", "content": None}], "messages[0].content: "),
    ([{"role": "user", "content": 5}], "messages[0].content: "),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]: "),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     "messages[0].content[0].type: "),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text: "),
])
def test_chat_template_rejects_bad_messages(tok, messages, field):
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template(messages)
    assert str(info.value).startswith(field)


def test_no_chat_template(tmp_path):
    tiny_models.build_tokenizer(str(tmp_path))
    config = tmp_path / "tokenizer_config.json"
    if (tmp_path / "chat_template.jinja").exists():
        os.remove(tmp_path / "chat_template.jinja")
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    tok = Tokenizer.load(ModelSource(str(tmp_path), False, "tiny"))
    with pytest.raises(ValueError, match=r"^messages: this model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_exception_is_a_value_error(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
    hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    tok = Tokenizer(hf, tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=r"^messages: .*roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_cache_write_tolerates_a_concurrent_writer(tok, tmp_path):
    from kvloom.engine.tokenizer import _save_atomically

    target = tmp_path / "tokenizers" / "key"
    _save_atomically(tok._tok, str(target))
    first = sorted(os.listdir(target))
    _save_atomically(tok._tok, str(target))  # loses the race: the entry already exists
    assert sorted(os.listdir(target)) == first and "tokenizer.json" in first
    assert os.listdir(tmp_path / "tokenizers") == ["key"]  # its temp dir was removed


# ---- IncrementalDetokenizer ------------------------------------------------------------------------


def _stream(tok, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.finish()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_matches_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, rest = _stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas + [rest])


def test_incremental_detokenizer_holds_split_characters(tok):
    text = "héllo wörld ✓ 日本語 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # byte-level BPE splits the multi-byte characters across tokens
    deltas, rest = _stream(tok, ids)
    assert "" in deltas  # some tokens end inside a character and yield nothing yet
    assert rest == ""
    emitted = ""
    for i, delta in enumerate(deltas):
        emitted += delta
        assert text.startswith(emitted)
        assert emitted == tok.decode(ids[:i + 1]).rstrip("\ufffd")


def test_incremental_detokenizer_with_prompt_and_special_tokens(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi 日本"}])
    generated = tok.encode("Hello 🙂 world", add_special_tokens=False) + [2]
    deltas, rest = _stream(tok, generated, prompt)
    assert "".join(deltas) + rest == tok.decode(generated) == "Hello 🙂 world"


def test_incremental_detokenizer_invalid_bytes_end_as_replacement(tok):
    ids = tok.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    deltas, rest = _stream(tok, ids[:-1])  # stops inside the character
    assert deltas == [""] * (len(ids) - 1)
    assert rest == tok.decode(ids[:-1]) and "\ufffd" in rest


# ---- StopStringMatcher -----------------------------------------------------------------------------


def _run(stops, deltas):
    matcher = StopStringMatcher(stops)
    out, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            break
    tail = "" if stopped else matcher.flush()
    return "".join(out) + tail, stopped, matcher.stopped_by, out


def test_stop_split_across_many_deltas():
    text, stopped, by, out = _run(["STOP"], ["Hello S", "T", "O", "P and more", "never"])
    assert (text, stopped, by) == ("Hello ", True, "STOP")
    assert out == ["Hello ", "", "", ""]  # "S", "ST", "STO" held back until known


def test_stop_at_the_very_beginning():
    assert _run(["Hel"], ["Hello"])[:3] == ("", True, "Hel")
    assert _run(["Hel"], ["H", "e", "l", "lo"])[:3] == ("", True, "Hel")


def test_stop_strings_where_one_is_a_prefix_of_another():
    # the earliest-ending stop wins, however the text is split into deltas
    for deltas in (["a", "b", "c"], ["abc"], ["xab", "c"]):
        text, stopped, by, _ = _run(["abc", "ab"], deltas)
        assert stopped and by == "ab" and text == "".join(deltas)[: "".join(deltas).index("ab")]
    text, stopped, by, _ = _run(["xabc", "ab"], ["xabc"])
    assert (text, by) == ("x", "ab")


def test_partial_match_that_is_not_a_stop_is_emitted_in_full():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("a </e") == ("a ", False)
    assert matcher.feed("nd") == ("", False)
    assert matcher.feed("x> b") == ("</endx> b", False)
    assert matcher.stopped_by is None
    assert matcher.flush() == ""


def test_overlapping_partial_matches():
    # "aab": a false start "a" followed by the real stop
    assert _run(["ab"], ["a", "a", "b", "c"])[:3] == ("a", True, "ab")
    assert _run(["abab"], ["ab", "ab", "ab"])[:3] == ("", True, "abab")
    assert _run(["abac"], ["ab", "ab", "ac"])[:3] == ("ab", True, "abac")


def test_flush_returns_held_remainder():
    matcher = StopStringMatcher(["\n\nUser:", "###"])
    assert matcher.feed("answer\n\nUs") == ("answer", False)
    assert matcher.flush() == "\n\nUs"
    assert matcher.flush() == ""


def test_nothing_after_stop_is_emitted():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("one END two") == ("one ", True)
    assert matcher.feed("three") == ("", True)
    assert matcher.flush() == ""
    assert matcher.stopped_by == "END"


def test_include_stop_emits_text_through_the_stop_string():
    matcher = StopStringMatcher(["END", "ENDING"], include_stop=True)
    assert matcher.feed("one EN") == ("one ", False)
    assert matcher.feed("D two") == ("END", True)
    assert matcher.feed("three") == ("", True) and matcher.stopped_by == "END"


def test_detokenizer_keeps_special_tokens_when_asked(tok):
    ids = tok.encode("<|im_start|>Hi<|im_end|>", add_special_tokens=False)
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tok)
    assert "".join(kept.add(i) for i in ids) + kept.finish() == "<|im_start|>Hi<|im_end|>"
    assert "".join(skipped.add(i) for i in ids) + skipped.finish() == "Hi"


def test_no_stop_strings_pass_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_stop_validation():
    with pytest.raises(ValueError, match=r"^stop"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(ValueError, match=r"^stop\[0\]"):
        StopStringMatcher([3])


def test_detokenizer_and_stop_strings_together(tok):
    text = "Once upon a time 日本語 there was a model. The end."
    ids = tok.encode(text, add_special_tokens=False)
    detok, matcher = IncrementalDetokenizer(tok), StopStringMatcher(["本語 there", "zzz"])
    out = ""
    for i in ids:
        emitted, stopped = matcher.feed(detok.add(i))
        out += emitted
        if stopped:
            break
    assert stopped and out == "Once upon a time 日"


# ---- the default model (GGUF) ----------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_tokenizer_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    source = resolve_source(None)
    assert source.is_gguf

    first = Tokenizer.load(source)
    assert first.loaded_from_cache is False
    entries = os.listdir(tmp_path / "tokenizers")
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temp dir left behind
    assert "tokenizer.json" in os.listdir(tmp_path / "tokenizers" / entries[0])

    second = Tokenizer.load(source)
    assert second.loaded_from_cache is True

    messages = [{"role": "user", "content": "What is 2+2? héllo 日本語 🙂"}]
    ids = first.apply_chat_template(messages)
    assert ids == second.apply_chat_template(messages)
    assert first.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    for tok in (first, second):
        assert 2 in tok.eos_token_ids
        assert "<|im_start|>assistant" in tok.chat_template
        assert tok.vocab_size == first.vocab_size
        assert tok.name_or_path == source.path
    text = "héllo wörld ✓ 日本語 🙂"
    deltas, rest = _stream(second, second.encode(text, add_special_tokens=False), ids)
    assert "".join(deltas) + rest == text


# ---- GGUF tokenizers, built without PyTorch ----------------------------------------------------------

MIXED_TEXTS = TEXTS + [
    "Numbers 0 1 12 123 1234 3.14159 -42 1e10 and 2+2=4",
    "def f(x):\n    return x ** 2  # code\n\tindented\r\nwindows line",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n<|endoftext|>",
    "It's, we're, they'll, I'd, you've: contractions; CAPS and MiXeD case",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, 한국어, ไทย",
    "    many     spaces   \n\n\n blank lines",
    "URLs https://example.com/a?b=c&d=e and emails a.b@example.org",
    "zero-width\u200bjoiner\u200d and combining e\u0301 and NBSP\u00a0here",
]


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_checkpoints, tmp_path_factory):
    """name -> path of tiny GGUF files: no BOS and the default GPT-2 split; BOS and the Llama 3 split."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    checkpoint = tiny_checkpoints("llama")
    return {
        "plain": tiny_models.build_gguf(str(root / "plain.gguf"), checkpoint),
        "bos_llama3": tiny_models.build_gguf(str(root / "bos_llama3.gguf"), checkpoint, add_bos_token=True,
                                             pre="llama-bpe"),
    }


def assert_same_tokenizer(ours, reference):
    """Same vocabulary, merges, special tokens, pipeline and template, and the same ids and text."""
    ours_json = json.loads(ours.backend_tokenizer.to_str())
    ref_json = json.loads(reference.backend_tokenizer.to_str())
    for part in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours_json[part] == ref_json[part], part
    assert ours.special_tokens_map == reference.special_tokens_map
    assert ours.chat_template == reference.chat_template and ours.chat_template
    assert len(ours) == len(reference)
    for text in MIXED_TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MIXED_TEXTS[1]}]
    assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _transformers_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         local_files_only=True)


@pytest.mark.parametrize("name", ["plain", "bos_llama3"])
def test_tiny_gguf_tokenizer_equals_transformers(tiny_ggufs, name):
    from kvloom.engine.gguf_tokenizer import build_tokenizer, read_tokenizer_metadata

    path = tiny_ggufs[name]
    ours = build_tokenizer(read_tokenizer_metadata(path))
    assert_same_tokenizer(ours, _transformers_gguf_tokenizer(path))
    # with add_bos_token, <|im_start|> (1, the file's BOS) comes first
    first_id = 1 if name == "bos_llama3" else ours.encode("Hi", add_special_tokens=False)[0]
    assert ours.encode("Hi")[0] == first_id


def test_unsupported_gguf_vocabulary_is_named(tiny_ggufs):
    from kvloom.engine.gguf_tokenizer import (UnsupportedGGUFTokenizer, build_tokenizer,
                                              read_tokenizer_metadata)

    metadata = read_tokenizer_metadata(tiny_ggufs["plain"])
    with pytest.raises(UnsupportedGGUFTokenizer, match=r"^tokenizer\.ggml\.model: 'bert'"):
        build_tokenizer({**metadata, "tokenizer.ggml.model": "bert"})


# Loads a GGUF model the way `kvloom serve` does, in a process where `import torch` fails, then reports
# the ids of a chat prompt and whether torch was ever imported.
_NO_TORCH_SCRIPT = """
import json, sys
sys.modules["torch"] = None  # as if PyTorch were not installed: `import torch` raises ImportError
from kvloom.engine.models.source import resolve_source
from kvloom.engine.tokenizer import Tokenizer
path = sys.argv[1] or None
if sys.argv[2] == "weights":
    from kvloom.engine.models.loader import load_model
    load_model(path)
tok = Tokenizer.load(resolve_source(path))
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[3]}])
print(json.dumps({"ids": ids, "cached": tok.loaded_from_cache, "torch": sys.modules.get("torch") is not None,
                  "jax": "jax" in sys.modules}))
"""


def load_without_torch(path, tmp_path, prompt, weights=False):
    env = dict(os.environ, KVLOOM_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, path or "", "weights" if weights else "",
                          prompt], env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiny_gguf_model_loads_without_torch(tiny_ggufs, tmp_path):
    prompt = MIXED_TEXTS[1]
    reference = _transformers_gguf_tokenizer(tiny_ggufs["plain"])
    want = reference.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    first = load_without_torch(tiny_ggufs["plain"], tmp_path, prompt, weights=True)
    assert first == {"ids": want, "cached": False, "torch": False, "jax": True}
    second = load_without_torch(tiny_ggufs["plain"], tmp_path, prompt)
    assert second == {"ids": want, "cached": True, "torch": False, "jax": False}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_gguf_tokenizer_equals_transformers():
    from kvloom.engine.gguf_tokenizer import build_tokenizer, read_tokenizer_metadata

    path = resolve_source(None).path
    assert_same_tokenizer(build_tokenizer(read_tokenizer_metadata(path)), _transformers_gguf_tokenizer(path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_tokenizer_loads_without_torch(tmp_path):
    got = load_without_torch(None, tmp_path, "What is 2+2? héllo 日本語 🙂")
    reference = _transformers_gguf_tokenizer(resolve_source(None).path)
    want = reference.apply_chat_template([{"role": "user", "content": "What is 2+2? héllo 日本語 🙂"}],
                                         add_generation_prompt=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    assert got == {"ids": want, "cached": False, "torch": False, "jax": False}


def test_other_gguf_vocabularies_without_torch_name_the_way_out(tiny_ggufs, tmp_path, monkeypatch):
    import importlib.util

    from kvloom.engine import gguf_tokenizer
    from kvloom.engine.tokenizer import TokenizerLoadError

    metadata = gguf_tokenizer.read_tokenizer_metadata(tiny_ggufs["plain"])
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gguf_tokenizer, "read_tokenizer_metadata",
                        lambda path: {**metadata, "tokenizer.ggml.model": "llama"})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(TokenizerLoadError, match=r"plain\.gguf: tokenizer\.ggml\.model 'llama': only "):
        Tokenizer.load(ModelSource(tiny_ggufs["plain"], True, "plain"))
