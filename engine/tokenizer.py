"""Text in and out of token ids: the transformers tokenizer, the chat template,
incremental detokenization of a token stream, and stop strings.

Data flow for one request: a prompt (text, or chat messages rendered by the
model's template) becomes ids through `Tokenizer`; each generated id goes
through the request's own `IncrementalDetokenizer` (one per request, holding
back bytes of an unfinished UTF-8 character) and the resulting text delta
through its own `StopStringMatcher` (holding back text that may start a stop
string). Both hold only per-request state; a `Tokenizer` is read-only after
`load()` and may be shared by every request of an engine.

A GGUF model's tokenizer is built from the file's metadata by
`engine/gguf_tokenizer.py` (with `gguf` and `tokenizers`, no PyTorch; seconds,
mostly reading the file); the result is cached on disk under
`$KVLOOM_CACHE_DIR/tokenizers/<key>` (default `~/.cache/kvloom`), keyed by the
file's absolute path, size and mtime, so later loads take a fraction of a
second. Nothing here touches the network or imports JAX or PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Sequence

from kvloom.engine.config import cache_root

if TYPE_CHECKING:
    from kvloom.engine.models.source import ModelSource

log = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# How many prompt ids give context to the first generated tokens (as vLLM does).
PROMPT_CONTEXT_IDS = 5
GGUF_BUILDER_VERSION = 2  # bump when engine/gguf_tokenizer.py builds differently: old cache entries go stale
_BYTE_FALLBACK_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerLoadError(Exception):
    """The tokenizer could not be loaded; the message names the path."""


def gguf_cache_key(path: str) -> str:
    """Identifies one GGUF file's built tokenizer: absolute path, size, mtime, the builder's version and
    the versions of the libraries that write and read the cached files."""
    import tokenizers
    import transformers

    path = os.path.abspath(path)
    st = os.stat(path)
    raw = (f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{GGUF_BUILDER_VERSION}\0{transformers.__version__}"
           f"\0{tokenizers.__version__}")
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Tokenizer:
    """A transformers tokenizer behind the few calls the engine makes."""

    def __init__(self, hf_tokenizer: Any, name_or_path: str, extra_eos_ids: Sequence[int] = (),
                 loaded_from_cache: bool = False):
        self._tok = hf_tokenizer
        self.name_or_path = name_or_path
        self.vocab_size = len(hf_tokenizer)
        self.loaded_from_cache = loaded_from_cache  # True when a GGUF tokenizer came from the disk cache
        eos: list[int] = []
        if hf_tokenizer.eos_token_id is not None:
            eos.append(int(hf_tokenizer.eos_token_id))
        for i, token_id in enumerate(extra_eos_ids):
            if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
                raise ValueError(f"extra_eos_ids[{i}]: must be an int, got {token_id!r}")
            token_id = int(token_id)  # numpy ints too
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"extra_eos_ids[{i}]: {token_id} is outside the vocabulary [0, {self.vocab_size})")
            eos.append(token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self._byte_decoder = _byte_decoder_of(hf_tokenizer)
        self._special_ids = frozenset(int(i) for i in getattr(hf_tokenizer, "added_tokens_decoder", {}))

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: "ModelSource", extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
        """From a checkpoint directory, or from a GGUF file's metadata through the disk cache."""
        if not source.is_gguf:
            return cls(_from_pretrained(source.path), source.path, extra_eos_ids)
        try:
            cache_dir = os.path.join(cache_root(), "tokenizers", gguf_cache_key(source.path))
        except OSError as exc:
            raise TokenizerLoadError(f"{source.path}: cannot read the GGUF file: {exc}") from exc
        if os.path.isfile(os.path.join(cache_dir, "tokenizer_config.json")):
            try:
                return cls(_from_cache(cache_dir), source.path, extra_eos_ids, loaded_from_cache=True)
            except TokenizerLoadError as exc:
                log.warning("ignoring a broken tokenizer cache entry: %s", exc)
                shutil.rmtree(cache_dir, ignore_errors=True)
        hf_tokenizer = _from_gguf(source.path)
        _save_atomically(hf_tokenizer, cache_dir)
        return cls(hf_tokenizer, source.path, extra_eos_ids)

    def with_eos_ids(self, extra_eos_ids: Sequence[int]) -> "Tokenizer":
        """This tokenizer, also ending sequences at `extra_eos_ids` (the model config's), loaded once:
        the engine loads the tokenizer while the model loads, before it knows the model's ids."""
        return Tokenizer(self._tok, self.name_or_path, extra_eos_ids, self.loaded_from_cache)

    # ---- text <-> ids --------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer itself (the grammar compiler reads its vocabulary)."""
        return self._tok

    @property
    def chat_template(self) -> Optional[str]:
        template = getattr(self._tok, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        return template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of spaces: output is verbatim, and decoding stays prefix-stable for streaming.
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            add_special_tokens: bool = False) -> list[int]:
        """Renders validated messages with the model's template; returns the prompt ids. The template
        writes its own special tokens (BOS, <|im_start|>), so by default none are added."""
        normalized = validate_messages(messages)
        if not self.chat_template:
            raise ValueError("messages: this model has no chat template")
        from jinja2 import TemplateError

        try:
            text = self._tok.apply_chat_template(normalized, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:  # the template's own raise_exception(), e.g. roles must alternate
            raise ValueError(f"messages: the chat template rejected the messages: {exc}") from exc
        return self.encode(text, add_special_tokens=add_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entries of `ids`, as the tokenizer spells them (e.g. "Ġhello" in byte-level BPE)."""
        return [self._token(int(i)) for i in ids]

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprobs (a partial UTF-8 character shows as U+FFFD)."""
        token = self._token(token_id)
        return self._tok.convert_tokens_to_string([token])

    def token_bytes(self, token_id: int) -> list[int]:
        """The raw bytes of one token. For byte-level BPE and byte-fallback tokens these are the token's
        own bytes (so a token holding half of a character still has its true bytes); otherwise the
        UTF-8 bytes of `token_text`."""
        token = self._token(token_id)
        if token_id not in self._special_ids:
            if self._byte_decoder is not None and all(ch in self._byte_decoder for ch in token):
                return [self._byte_decoder[ch] for ch in token]
            match = _BYTE_FALLBACK_TOKEN.match(token)
            if match:
                return [int(match.group(1), 16)]
        return list(self._tok.convert_tokens_to_string([token]).encode("utf-8"))

    def _token(self, token_id: int) -> str:
        token = self._tok.convert_ids_to_tokens(int(token_id)) if 0 <= token_id < self.vocab_size else None
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return token


def validate_messages(messages: Any) -> list[dict]:
    """Checks chat messages; returns copies with list-of-parts content joined into one string.
    A ValueError's message starts with the path of the offending field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"{where}.role: must be one of {sorted(CHAT_ROLES)}, got {role!r}")
        if "content" not in message:
            raise ValueError(f"{where}.content: is required")
        content = message["content"]
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                part_where = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise ValueError(f"{part_where}: must be an object {{'type': 'text', 'text': ...}}")
                if part.get("type") != "text":
                    raise ValueError(
                        f"{part_where}.type: only 'text' parts are supported, got {part.get('type')!r}")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{part_where}.text: must be a string")
                texts.append(part["text"])
            content = "\n".join(texts)  # as vLLM joins text parts
        elif not isinstance(content, str):
            raise ValueError(f"{where}.content: must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append({**message, "role": role, "content": content})
    return out


def _from_pretrained(path: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:  # missing files, unsupported GGUF metadata, corrupt JSON
        where = os.path.join(path, kwargs["gguf_file"]) if "gguf_file" in kwargs else path
        raise TokenizerLoadError(f"{where}: cannot load the tokenizer: {exc}") from exc


def _from_cache(cache_dir: str):
    """A cached GGUF tokenizer: transformers' fast tokenizer class itself when the entry names it (the
    tokenizer this module builds), which saves importing the AutoTokenizer machinery; else AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    try:
        with open(os.path.join(cache_dir, "tokenizer_config.json"), "rb") as f:
            named = json.load(f).get("tokenizer_class")
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{cache_dir}: cannot read tokenizer_config.json: {exc}") from exc
    if named != PreTrainedTokenizerFast.__name__:
        return _from_pretrained(cache_dir)
    try:
        return PreTrainedTokenizerFast.from_pretrained(cache_dir, local_files_only=True)
    except Exception as exc:  # missing files, corrupt JSON
        raise TokenizerLoadError(f"{cache_dir}: cannot load the tokenizer: {exc}") from exc


def _from_gguf(path: str):
    """Built from the file's metadata; a vocabulary kind not built here goes through transformers'
    converter, which needs PyTorch."""
    from kvloom.engine.gguf_tokenizer import (UnsupportedGGUFTokenizer, build_tokenizer,
                                              read_tokenizer_metadata)

    try:
        metadata = read_tokenizer_metadata(path)
    except Exception as exc:  # not a GGUF file, truncated, unreadable
        raise TokenizerLoadError(f"{path}: cannot read the GGUF metadata: {exc}") from exc
    try:
        return build_tokenizer(metadata)
    except UnsupportedGGUFTokenizer as exc:
        log.info("%s: %s; converting it with transformers (needs PyTorch)", path, exc)
    except Exception as exc:  # missing keys, inconsistent merges
        raise TokenizerLoadError(f"{path}: cannot build the tokenizer from the GGUF metadata: {exc}") from exc
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise TokenizerLoadError(
            f"{path}: tokenizer.ggml.model {metadata.get('tokenizer.ggml.model')!r}: only byte-level BPE "
            "vocabularies ('gpt2') are read without PyTorch; install torch, or serve the model's checkpoint "
            "directory instead")
    return _from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _save_atomically(hf_tokenizer, cache_dir: str) -> None:
    """Writes the tokenizer to a temp dir beside `cache_dir`, then renames it into place. A concurrent
    writer that wins the race leaves its own complete copy; failing to cache never fails a load."""
    parent = os.path.dirname(cache_dir)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_dir)}.", dir=parent)
        hf_tokenizer.save_pretrained(tmp)
        os.rename(tmp, cache_dir)  # atomic; fails if another writer's directory is already there
        tmp = None
    except OSError as exc:
        if not os.path.isdir(cache_dir):
            log.warning("could not cache the tokenizer in %s: %s", cache_dir, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _byte_decoder_of(hf_tokenizer) -> Optional[dict[str, int]]:
    """The GPT-2 unicode-to-byte table when the tokenizer decodes byte-level BPE, else None."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:
        return None
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    if not any(d.get("type") == "ByteLevel" for d in decoders if isinstance(d, dict)):
        return None
    from kvloom.engine.gguf_tokenizer import byte_level_alphabet

    return {char: byte for byte, char in byte_level_alphabet().items()}


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, correct across token boundaries:
    a token that ends inside a multi-byte UTF-8 character yields no text until the character is
    complete (never U+FFFD for a split character); with no prompt ids, the concatenation of all
    deltas plus finish() equals tokenizer.decode(all_generated_ids, skip_special_tokens=True).

    Prefix-offset / read-offset technique (vLLM's detokenize_incrementally, HF TextStreamer):
    `ids[prefix_offset:read_offset]` is already-emitted context and `ids[read_offset:]` the tokens
    not yet emitted; each step decodes only `ids[prefix_offset:]`, so the cost per token is the
    window's, not the sequence's. Both offsets sit on character boundaries once text is emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the tail of the prompt matters: it gives the first tokens their context
        # (a SentencePiece leading space), and is never emitted.
        self._ids: list[int] = [int(i) for i in list(prompt_ids)[-PROMPT_CONTEXT_IDS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Appends one generated id; returns the text it completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        delta = self._pending_text()
        if delta and not delta.endswith("\ufffd"):
            self._advance()
            return delta
        return ""

    def finish(self) -> str:
        """The text still held back at the end (an unfinished character decodes to U+FFFD here)."""
        delta = self._pending_text()
        self._advance()
        return delta

    def _pending_text(self) -> str:
        skip = self._skip_special_tokens
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], skip)
        full_text = self._tokenizer.decode(self._ids[self._prefix_offset:], skip)
        return full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""

    def _advance(self) -> None:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # Drop ids that can no longer be in a window, so memory stays O(window) too.
        if self._prefix_offset > 0:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


class StopStringMatcher:
    """Applies stop strings to a stream of text deltas. Text that might be the start of a stop string
    is held back until it is known not to be; when a stop string appears, the text before it is
    emitted and nothing after. The stop string itself is emitted only with `include_stop`.

    Generation stops at the first point in the text where some stop string is complete (the earliest
    end; among stops ending there, the one starting earliest), so the result does not depend on how
    the text was split into deltas. Invariant: no stop string can start inside emitted text.
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False):
        self._include_stop = include_stop
        if isinstance(stop, str):
            stop = [stop]
        stops = []
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise ValueError(f"stop[{i}]: must be a string, got {type(s).__name__}")
            if not s:
                raise ValueError(f"stop[{i}]: must not be empty")
            stops.append(s)
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.stopped_by: Optional[str] = None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped). After a stop, every call returns ("", True)."""
        if self.stopped_by is not None:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        hit = None  # (end, start, stop)
        for s in self._stops:
            start = text.find(s)
            if start >= 0 and (hit is None or (start + len(s), start) < hit[:2]):
                hit = (start + len(s), start, s)
        if hit is not None:
            self._held, self.stopped_by = "", hit[2]
            return text[:hit[0] if self._include_stop else hit[1]], True
        hold = self._partial_suffix_len(text)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """At the end of generation: the held-back text, which turned out not to be a stop."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self._stops):
                return k
        return 0
