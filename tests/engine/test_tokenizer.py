"""Tokenizer, chat template, incremental detokenizer and stop strings, on the tiny byte-level BPE
tokenizer of tests/tiny_models.py; one slow test loads the default GGUF model's tokenizer."""

import json
import os

import pytest

from kvloom.engine.models.loader import ModelSource, resolve_source
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
