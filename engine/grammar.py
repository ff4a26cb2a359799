"""Structured output: JSON grammars compiled against the vocabulary, one matcher per request, and the
packed token bitmask that the jitted sampler applies.

Who does what, all on the event loop (the compute thread only ever sees bitmasks, as data):

    Engine._new_request    compiler.matcher(params.response_format) -> request.grammar
                           (a schema that cannot be compiled: ValueError naming its field)
    Scheduler.schedule     row.token_bitmask = request.grammar.bitmask()   (a read-only copy: rows are data)
    compute thread         engine.sampling.apply_token_bitmask: banned tokens' logits -> -1e30
    Scheduler.apply        request.grammar.accept(token)                    (the one place a matcher advances)
    engine.output          request.grammar.is_complete ends the request (STOP)

A bitmask is int32 [ceil(vocab_size / 32)]: bit j of word w allows token 32 * w + j. End of
sequence is allowed only where the JSON may end; ids past the tokenizer's vocabulary are never allowed.

The grammar engine is llguidance (Rust, no Python dependencies): a schema compiles in about a millisecond
and a mask fills in tens of microseconds on SmolLM2's 49k vocabulary. JSON is written with ", " and ": "
separators and no other whitespace between tokens, so a model cannot wander off into blank space.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from kvloom.engine.request import ResponseFormat

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED_GRAMMARS = 64


def num_bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def allowed_token_ids(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask allows, ascending (for tests and the fake runner)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask, np.int32).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, num_words: int):
        self._matcher = matcher
        self._num_words = num_words

    def bitmask(self) -> np.ndarray:
        """The tokens allowed next: int32 [num_words], read-only."""
        mask = np.empty(self._num_words, np.int32)
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        mask.flags.writeable = False
        return mask

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id` (end of sequence included); False if the grammar does not allow it,
        after which the matcher stays in error."""
        return self._matcher.consume_token(int(token_id))

    @property
    def is_complete(self) -> bool:
        """The JSON is complete and nothing can follow it but the end of sequence."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles response formats against one tokenizer. Built once per engine (building the token tables
    takes a few seconds for a 49k vocabulary); compiled grammars are kept, so a matcher for a schema
    seen recently is a copy of a ready one."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        n_vocab = max(vocab_size, len(hf_tokenizer))
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab,
                                                       eos_token=list(eos_token_ids))
        self.num_words = num_bitmask_words(vocab_size)
        self._compiled: OrderedDict[str, object] = OrderedDict()  # schema text -> a matcher at the start

    def matcher(self, response_format: ResponseFormat) -> GrammarMatcher:
        """A fresh matcher for the format; ValueError naming `response_format.field` if it cannot compile."""
        key = response_format.schema
        start = self._compiled.get(key)
        if start is None:
            start = self._compile(response_format)
            self._compiled[key] = start
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return GrammarMatcher(start.deep_copy(), self.num_words)

    def _compile(self, response_format: ResponseFormat):
        LLMatcher = self._llguidance.LLMatcher
        try:
            grammar = LLMatcher.grammar_from_json_schema(response_format.schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"{response_format.field}: {exc}") from None
        matcher = LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{response_format.field}: {matcher.get_error()}")
        return matcher
