"""tools.peers: llama.cpp in process against a fake llama_cpp module, the label log-probabilities, and a
missing peer skipped with its reason."""

import asyncio
import sys

import numpy as np
import pytest

from kvloom.tools import compare_workloads, peers
from kvloom.tools.command_args import COMPARE_WORKLOADS
from kvloom.tools.compare_workloads import measure_system

pytestmark = pytest.mark.timeout(60)


class FakeLlama:
    """The few calls tools.peers makes on llama_cpp.Llama, answering with fixed logits."""

    def __init__(self, model_path, n_ctx, **kwargs):
        assert kwargs["logits_all"] is False and kwargs["n_threads"] == 2
        self.n_ctx, self.n_tokens, self.calls = n_ctx, 0, []
        self.ctx = object()
        FakeLlama.last = self

    def tokenize(self, text: bytes, add_bos: bool, special: bool):
        return [len(w) for w in text.decode().split()]

    def create_completion(self, prompt, max_tokens, temperature, repeat_penalty):
        assert isinstance(prompt, list) and len(prompt) + max_tokens <= self.n_ctx and temperature == 0.0
        self.calls.append(("complete", len(prompt), max_tokens))
        return {"usage": {"completion_tokens": max_tokens}}

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        self.calls.append(("eval", self.n_tokens, len(tokens)))
        self.n_tokens += len(tokens)

    def n_vocab(self):
        return 8


def test_llamacpp_in_process_with_a_fake_module(monkeypatch):
    import ctypes
    import types

    logits = (ctypes.c_float * 8)(*range(8))
    fake = types.SimpleNamespace(Llama=FakeLlama, llama_get_logits_ith=lambda ctx, i: ctypes.cast(
        logits, ctypes.POINTER(ctypes.c_float)))
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    sizes = compare_workloads.QUICK

    def encode(text):
        return [len(w) for w in text.split()]

    prompts = compare_workloads.build_prompt_set(encode, np.random.default_rng(0), sizes)
    system = peers.LlamaCppSystem("model.gguf", sizes, 2, ("a bb", [1, 2]))
    out = asyncio.run(measure_system(system, prompts, sizes, COMPARE_WORKLOADS))
    assert set(out) == {"decode@1", "decode@4", "prefill", "shared-prefix", "score"}
    assert all(m["value"] > 0 and m["same_tokenizer"] for m in out.values())
    assert out["decode@4"]["num_tokens"] == 4 * sizes.new_tokens
    # scoring: the query once, then every item right after it
    q, i = sizes.query_tokens, sizes.item_tokens
    evals = FakeLlama.last.calls[-(sizes.num_items + 1):]
    assert evals == [("eval", 0, q)] + [("eval", q, i)] * sizes.num_items


def test_label_logprobs():
    logits = np.array([1.0, 2.0, 3.0])
    expected = logits - np.log(np.exp(logits).sum())
    assert peers.label_logprobs(logits, [2, 0]) == pytest.approx([expected[2], expected[0]])


def test_a_missing_llama_cpp_skips_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(peers.PeerSkipped, match="llama-cpp-python is not installed"):
        peers.import_llama_cpp()
