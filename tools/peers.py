"""The peers `kvloom compare` sets beside kvloom, each a compare_workloads.System, each optional:
a peer that cannot run here raises PeerSkipped with a one-line reason.

    TransformersSystem   HF transformers in float32: greedy `generate` of a prompt group as one batch
                         (equal lengths, no padding); scoring as one batched forward over query++item rows
    LlamaCppSystem       llama-cpp-python in process, greedy, one sequence at a time; scoring evaluates
                         the query once, then each item after it
    LlamaCppModelFiles   the GGUFs the llama.cpp peers run (in process, and tools.llama_server's
                         llama-server), made once per format: the float conversion (tools.gguf_convert)
                         or the original file, labelled with its quantization
    load_hf              a kvloom model source loaded in transformers (also the benchmarks' reference)

The serving peer, llama.cpp's own llama-server, is a process (tools.llama_server) that kvloom compare
measures over HTTP with compare_systems.HttpSystem, as it measures kvloom's server.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Optional, Sequence

import numpy as np

from kvloom.tools.compare_workloads import InProcessSystem, PromptSet, Sizes, log, measured
from kvloom.tools.gguf_convert import float_gguf, gguf_file_type_name

INSTALL_HINT = "pip install 'kvloom[peers]'"


class PeerSkipped(Exception):
    """A peer cannot run here; the message says why, in one line."""


def load_hf(source):
    """The model of a kvloom ModelSource in transformers, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(gguf_file=os.path.basename(source.path)) if source.is_gguf else {}
    return AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs).eval()


# ---- HF transformers ----------------------------------------------------------------------------

class TransformersSystem(InProcessSystem):
    name = "transformers"

    def __init__(self, source):
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise PeerSkipped(f"{' and '.join(missing)} not installed: pip install torch transformers")
        import torch

        log("loading the model in transformers")
        self.torch, self.model = torch, load_hf(source)

    def _generate_s(self, batch: list[list[int]], new_tokens: int) -> float:
        torch = self.torch
        ids = torch.tensor(batch, dtype=torch.long)  # ids: [B, T]
        with torch.inference_mode():
            t0 = time.perf_counter()
            tokens = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         eos_token_id=None, pad_token_id=0, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens)
            wall_s = time.perf_counter() - t0
        if tuple(tokens.shape) != (len(batch), ids.shape[1] + new_tokens):
            raise RuntimeError(f"transformers generated shape {tuple(tokens.shape)}")
        return wall_s

    async def warm_up(self, prompts: PromptSet) -> None:
        self._generate_s(prompts.prefill[:1], 1)

    async def batch(self, prompts: list, new_tokens: int) -> dict:
        self._generate_s(prompts, min(2, new_tokens))  # warm-up at this batch size
        wall_s = self._generate_s(prompts, new_tokens)
        return measured(len(prompts) * new_tokens / wall_s, wall_s=wall_s,
                        num_tokens=len(prompts) * new_tokens)

    async def first_token_s(self, prompt: list[int]) -> float:
        return self._generate_s([prompt], 1)

    async def score_s(self, query: list[int], items: list[list[int]], label_ids: Sequence[int]) -> float:
        torch = self.torch
        ids = torch.tensor([query + item for item in items], dtype=torch.long)  # ids: [N, Q + I]
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.model(ids, logits_to_keep=1).logits[:, -1]  # logits: [N, V]
            torch.log_softmax(logits.float(), dim=-1)[:, list(label_ids)]  # [N, L]
            return time.perf_counter() - t0


# ---- llama.cpp in process -----------------------------------------------------------------------

def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        reason = "" if isinstance(exc, ModuleNotFoundError) and exc.name == "llama_cpp" else f" ({exc})"
        raise PeerSkipped(f"llama-cpp-python is not installed{reason}: {INSTALL_HINT}") from None
    except OSError as exc:  # the shared library failed to load
        raise PeerSkipped(f"llama-cpp-python does not load: {exc}") from None
    return llama_cpp


def label_logprobs(logits: np.ndarray, label_ids: Sequence[int]) -> list[float]:
    """log P(label) under softmax over the whole vocabulary; logits: [V]."""
    logits = logits.astype(np.float64)
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    return [float(logits[i] - log_z) for i in label_ids]


class LlamaCppSystem(InProcessSystem):
    """The number of generated tokens is the usage llama.cpp reports (EOS is not suppressed:
    llama-cpp-python has no ignore_eos); its batches are requests in turn."""

    name = "llama.cpp"

    def __init__(self, model_path: str, sizes: Sizes, num_threads: int, tokenizer_probe: tuple[str,
                                                                                               list[int]]):
        self.llama_cpp = import_llama_cpp()
        self.llm = self.llama_cpp.Llama(model_path=model_path, n_ctx=sizes.max_context + 16, n_batch=512,
                                        n_threads=num_threads, n_threads_batch=num_threads, logits_all=False,
                                        verbose=False)
        text, ids = tokenizer_probe
        self.is_same_tokenizer = list(self.llm.tokenize(text.encode("utf-8"), add_bos=False,
                                                        special=False)) == ids
        if not self.is_same_tokenizer:
            log("llama.cpp tokenizes differently from kvloom; the prompts are given as kvloom's token ids")

    def _complete(self, prompt: list[int], max_tokens: int) -> int:
        out = self.llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                         repeat_penalty=1.0)
        return int(out["usage"]["completion_tokens"])

    async def warm_up(self, prompts: PromptSet) -> None:
        self._complete(prompts.warmup[0], 2)

    async def batch(self, prompts: list, new_tokens: int) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        num_tokens = sum(self._complete(p, new_tokens) for p in prompts)
        wall_s = time.perf_counter() - t0
        return measured(num_tokens / wall_s, wall_s=wall_s, num_tokens=num_tokens,
                        requested_tokens=len(prompts) * new_tokens, same_tokenizer=self.is_same_tokenizer)

    async def first_token_s(self, prompt: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self._complete(prompt, 1)
        return time.perf_counter() - t0

    async def score_s(self, query: list[int], items: list[list[int]], label_ids: Sequence[int]) -> float:
        """The query once, then each item after it (n_tokens rewound: eval drops the KV past it)."""
        llm = self.llm
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(query)
        for item in items:
            llm.n_tokens = len(query)
            llm.eval(item)
            last = self.llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))  # logits: [V]
            label_logprobs(logits, label_ids)
        return time.perf_counter() - t0

    async def prefill(self, prompts: list, num_tokens: int) -> dict:
        return dict(await super().prefill(prompts, num_tokens), same_tokenizer=self.is_same_tokenizer)

    async def score(self, sets: list, label_ids: Sequence[int], num_items: int) -> dict:
        return dict(await super().score(sets, label_ids, num_items), same_tokenizer=self.is_same_tokenizer)


class LlamaCppModelFiles:
    """The GGUFs llama.cpp runs, each made once for every llama.cpp peer: the float conversion ("f32",
    "f16"), or the original file (labelled with its quantization) when converting is not possible or
    "original" is asked."""

    def __init__(self, source, cache_dir: str):
        self.source, self.cache_dir = source, cache_dir
        self._made: dict[str, tuple[str, str, Optional[str]]] = {}

    def get(self, gguf_format: str) -> tuple[str, str, Optional[str]]:
        """(path, tag for the column title, note) of "f32", "f16" or "original"."""
        if gguf_format not in self._made:
            self._made[gguf_format] = self._make(gguf_format)
        return self._made[gguf_format]

    def _make(self, gguf_format: str):
        if gguf_format != "original":
            try:
                return float_gguf(self.source, gguf_format, self.cache_dir), gguf_format.upper(), None
            except Exception as exc:  # noqa: BLE001 - fall back to the original file below
                if not self.source.is_gguf:
                    raise PeerSkipped(f"cannot convert {self.source.path} to a GGUF: {exc}") from None
                note = f"conversion to {gguf_format.upper()} failed ({type(exc).__name__}: {exc}); " \
                       "running the original file"
                log(note)
                return self.source.path, f"({gguf_file_type_name(self.source.path)})", note
        if not self.source.is_gguf:
            raise PeerSkipped("the original file runs only when the model is a .gguf")
        return self.source.path, f"({gguf_file_type_name(self.source.path)})", None
