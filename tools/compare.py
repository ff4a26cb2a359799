"""`kvloom compare`: the same workloads, in one run, on kvloom and on the peers a user would pick
instead on a CPU machine, with kvloom's ratio to each and to the machine's roofline.

    kvloom compare [--model PATH] [--peers hf,llamacpp,llamacpp-server]
        [--workloads decode,prefill,shared-prefix,score] [--quick] [--json OUT.json]

Data flow:
  args -> Sizes (full or --quick, then the size options) and the engine config
  the machine: float32 matmul peak (jitted jnp.dot) and copy bandwidth -> Roofline (tok/s bounds)
  kvloom: one Engine, started once; its tokenizer turns random words into the prompts (PromptSet:
      token ids in process; the same ids decoded to text over HTTP, where llama.cpp's server takes
      text only); the in-process figures; then the same engine behind create_app on loopback,
      driven by tools.bench.run_bench; the engine is stopped before any peer runs
  peers, each optional, each skipped with a one-line message when it cannot run:
      hf               transformers `generate` (one batch of the same prompts), batched forwards to score
      llamacpp         llama-cpp-python in process, on the model as a float GGUF (float_gguf)
      llamacpp-server  `python -m llama_cpp.server` on a free loopback port, driven by run_bench
  measurements {system: {figure: {"value", ...}}} -> rows -> the printed table and --json

Figures (higher is better; every figure includes its prefill):
  decode @C       C requests of --prompt-tokens submitted at once, --new-tokens each (EOS ignored
                  where the system allows it); generated tokens / wall time
  prefill         --prefill-tokens fresh prompts, max_tokens=1; prompt tokens / time to first token
  shared-prefix   N requests = one shared prefix + own tokens, at once; generated tokens / wall time
  score           a query and items; items / time (kvloom Engine.score; HF one batched forward over
                  query++item rows; llama.cpp the query evaluated once, then each item after it)
llama-cpp-python runs one sequence at a time: its "@C" figures are C requests back to back, and its
server answers concurrent requests in turn. Roofline: compute = peak / (2 x params) tok/s for every
figure; decode is also bounded by memory, batch x bandwidth / (params x 4 bytes) tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from kvloom.tools import command_args
from kvloom.tools.workload import WORDS
from kvloom.tools.engine_args import engine_config_from_args, use_compile_cache
from kvloom.tools.bench_engine import roofline_tokens_per_s
from kvloom.tools.report import format_value, ratio

IN_PROCESS, HTTP = "in process", "HTTP"
PEER_MODES = {"hf": IN_PROCESS, "llamacpp": IN_PROCESS, "llamacpp-server": HTTP}
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")
INSTALL_HINT = "pip install 'kvloom[peers]'"
CONVERTER_VERSION = 1  # part of the converted file's cache key


class PeerSkipped(Exception):
    """A peer cannot run here; the message says why, in one line."""


class ConversionError(Exception):
    """The model cannot be written as a float GGUF; the message names the reason."""


# ---- sizes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    concurrency: tuple[int, ...]
    prompt_tokens: int  # decode prompts
    new_tokens: int  # decode
    prefill_tokens: int
    prefix_tokens: int  # shared-prefix: the common head
    unique_tokens: int  # shared-prefix: each request's own tail
    num_shared_requests: int
    shared_new_tokens: int
    query_tokens: int
    num_items: int
    item_tokens: int
    repeats: int  # prefill prompts and score calls (medians reported)
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    copy_mib: int  # bandwidth probe buffer

    @property
    def max_context(self) -> int:
        """The longest sequence any workload builds."""
        return max(self.prompt_tokens + self.new_tokens, self.prefill_tokens + 1,
                   self.prefix_tokens + self.unique_tokens + self.shared_new_tokens,
                   self.query_tokens + self.item_tokens + 1)


FULL = Sizes(concurrency=(1, 8, 32), prompt_tokens=32, new_tokens=128, prefill_tokens=512, prefix_tokens=400,
             unique_tokens=32, num_shared_requests=16, shared_new_tokens=32, query_tokens=128, num_items=16,
             item_tokens=16, repeats=3, matmul_sizes=(2048, 3072), matmul_repeats=5, copy_mib=256)
QUICK = Sizes(concurrency=(1, 4), prompt_tokens=16, new_tokens=16, prefill_tokens=128, prefix_tokens=48,
              unique_tokens=16, num_shared_requests=4, shared_new_tokens=8, query_tokens=32, num_items=4,
              item_tokens=8, repeats=2, matmul_sizes=(256, 512), matmul_repeats=2, copy_mib=16)


def sizes_from_args(args) -> Sizes:
    sizes = QUICK if args.quick else FULL
    names = ("concurrency", "new_tokens", "prompt_tokens", "prefill_tokens", "repeats")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "concurrency" in given:
        given["concurrency"] = tuple(given["concurrency"])
    return dataclasses.replace(sizes, **given)


# ---- roofline -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Roofline:
    """Upper bounds on tokens/s for one float32 model on this machine.

    compute: every token costs 2 FLOPs per parameter at the matmul peak (any figure);
    memory: a decode step reads every weight once, shared by the batch, so batch B decodes at most
    B x bandwidth / (params x 4 bytes) tok/s (KV-cache reads ignored: a bound, not an estimate)."""

    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    num_parameters: int
    bytes_per_parameter: int = 4  # float32

    @property
    def compute_tok_s(self) -> float:
        return roofline_tokens_per_s(self.peak_flops, self.num_parameters)

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.bytes_per_parameter

    @property
    def memory_tok_s(self) -> float:
        """Decode at batch 1."""
        return self.bandwidth / self.weight_bytes

    def decode_tok_s(self, batch: int) -> float:
        return min(self.compute_tok_s, batch * self.memory_tok_s)

    def score_items_s(self, query_tokens: int, num_items: int, item_tokens: int) -> float:
        """The query computed once, then each item's tokens."""
        return self.compute_tok_s * num_items / (query_tokens + num_items * item_tokens)

    def to_json(self) -> dict:
        return dict(peak_gflops=self.peak_flops / 1e9, bandwidth_gb_s=self.bandwidth / 1e9,
                    num_parameters=self.num_parameters, weight_bytes=self.weight_bytes,
                    compute_tok_s=self.compute_tok_s, memory_tok_s_batch1=self.memory_tok_s)


@dataclass(frozen=True)
class Figure:
    key: str  # "decode@8", "prefill", "shared-prefix", "score": the measurements' key
    workload: str
    label: str
    unit: str
    roofline: float  # same unit


def figures(sizes: Sizes, workloads: Sequence[str], roof: Roofline) -> list[Figure]:
    out = []
    if "decode" in workloads:
        out += [Figure(f"decode@{c}", "decode", f"decode tok/s @{c}", "tok/s", roof.decode_tok_s(c))
                for c in sizes.concurrency]
    if "prefill" in workloads:
        out.append(Figure("prefill", "prefill", f"prefill tok/s ({sizes.prefill_tokens}-tok prompt)", "tok/s",
                          roof.compute_tok_s))
    if "shared-prefix" in workloads:
        label = (f"shared-prefix tok/s ({sizes.num_shared_requests}x "
                 f"{sizes.prefix_tokens}+{sizes.unique_tokens})")
        out.append(Figure("shared-prefix", "shared-prefix", label, "tok/s",
                          roof.decode_tok_s(sizes.num_shared_requests)))
    if "score" in workloads:
        label = f"score items/s ({sizes.num_items}x{sizes.item_tokens}, q{sizes.query_tokens})"
        out.append(Figure("score", "score", label, "items/s",
                          roof.score_items_s(sizes.query_tokens, sizes.num_items, sizes.item_tokens)))
    return out


# ---- the machine --------------------------------------------------------------------------------

def measure_bandwidth(num_bytes: int, repeats: int) -> dict:
    """Best copy bandwidth (bytes read + written per second) of a numpy copy and of a jitted jnp
    `x + 1` over a float32 buffer of num_bytes; the better of the two is the figure."""
    import jax
    import jax.numpy as jnp

    from kvloom.tools.bench_model import _best_of

    n = num_bytes // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    np.copyto(dst, src)
    numpy_s = _best_of(lambda: np.copyto(dst, src), repeats)
    add_one = jax.jit(lambda x: x + 1.0)
    x = jnp.ones(n, jnp.float32)
    add_one(x).block_until_ready()  # compile
    jax_s = _best_of(lambda: add_one(x).block_until_ready(), repeats)
    by_method = {"numpy_copy": 2 * n * 4 / numpy_s, "jax_add": 2 * n * 4 / jax_s}
    return dict(num_bytes=n * 4, repeats=repeats, bytes_per_s_by_method=by_method,
                bytes_per_s=max(by_method.values()))


# ---- prompts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSet:
    """Every prompt of one run, as token ids (in process) or as text (HTTP): the same shapes."""

    warmup: list  # max(concurrency) decode-sized prompts
    decode: dict  # concurrency -> prompts
    prefill: list  # one fresh prompt per repeat
    shared: list  # shared prefix ++ own tokens, one per request
    score: list  # (query, items) per repeat; the first extra one warms up
    label_ids: tuple[int, ...]


Encode = Callable[[str], list[int]]


def random_token_ids(encode: Encode, rng: np.random.Generator, num_tokens: int) -> list[int]:
    """num_tokens ids of random common words: text a tokenizer reads back to about the same ids."""
    ids: list[int] = []
    while len(ids) < num_tokens:
        words = rng.choice(WORDS, size=max(8, num_tokens - len(ids)))
        ids += encode(" " + " ".join(words))
    return ids[:num_tokens]


def label_token_ids(encode: Encode) -> tuple[int, ...]:
    labels = tuple(dict.fromkeys(encode(text)[-1] for text in (" yes", " no")))
    return labels if len(labels) == 2 else tuple(encode(" yes no")[:2])


def build_prompt_set(encode: Encode, rng: np.random.Generator, sizes: Sizes) -> PromptSet:
    def many(count: int, num_tokens: int) -> list[list[int]]:
        return [random_token_ids(encode, rng, num_tokens) for _ in range(count)]

    prefix = random_token_ids(encode, rng, sizes.prefix_tokens)
    return PromptSet(
        warmup=many(max(sizes.concurrency), sizes.prompt_tokens),
        decode={c: many(c, sizes.prompt_tokens) for c in sizes.concurrency},
        prefill=many(sizes.repeats, sizes.prefill_tokens),
        shared=[prefix + own for own in many(sizes.num_shared_requests, sizes.unique_tokens)],
        score=[(random_token_ids(encode, rng, sizes.query_tokens), many(sizes.num_items, sizes.item_tokens))
               for _ in range(sizes.repeats + 1)],
        label_ids=label_token_ids(encode),
    )


def as_text(prompts: PromptSet, decode: Callable[[list[int]], str]) -> PromptSet:
    """The same prompts as text (the score set stays ids: HTTP scoring is kvloom's own endpoint)."""
    return dataclasses.replace(
        prompts, warmup=[decode(p) for p in prompts.warmup],
        decode={c: [decode(p) for p in ps] for c, ps in prompts.decode.items()},
        prefill=[decode(p) for p in prompts.prefill], shared=[decode(p) for p in prompts.shared])


def label_logprobs(logits: np.ndarray, label_ids: Sequence[int]) -> list[float]:
    """log P(label) under softmax over the whole vocabulary; logits: [V]."""
    logits = logits.astype(np.float64)
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    return [float(logits[i] - log_z) for i in label_ids]


def measured(value: Optional[float], **detail) -> dict:
    return {"value": value, **detail}


# ---- kvloom -------------------------------------------------------------------------------------

def engine_config(args, sizes: Sizes):
    """float32, as the peers run; max_running defaults to the largest batch a workload submits."""
    return engine_config_from_args(args, dtype="float32",
                                   max_running=max(*sizes.concurrency, sizes.num_shared_requests))


async def bench_kvloom_engine(engine, prompts: PromptSet, sizes: Sizes, workloads: Sequence[str]) -> dict:
    from kvloom.tools.bench_engine import run_batch, time_to_first_token

    out = {}
    if "decode" in workloads:
        await run_batch(engine, prompts.warmup, min(2, sizes.new_tokens))
        for c in sizes.concurrency:
            r = await run_batch(engine, prompts.decode[c], sizes.new_tokens)
            out[f"decode@{c}"] = measured(r["tok_s"], wall_s=r["wall_s"], num_tokens=c * sizes.new_tokens)
    if "prefill" in workloads:
        ttfts = [(await time_to_first_token(engine, p))[0] for p in prompts.prefill]
        ttft = statistics.median(ttfts)
        out["prefill"] = measured(sizes.prefill_tokens / ttft, ttft_s=ttft, ttfts_s=ttfts)
    if "shared-prefix" in workloads:
        r = await run_batch(engine, prompts.shared, sizes.shared_new_tokens)
        out["shared-prefix"] = measured(r["tok_s"], wall_s=r["wall_s"],
                                        num_tokens=len(prompts.shared) * sizes.shared_new_tokens)
    if "score" in workloads:
        (query, items), *timed = prompts.score
        await engine.score(query, items, list(prompts.label_ids))  # warm-up
        times = []
        for query, items in timed:
            t0 = time.perf_counter()
            await engine.score(query, items, list(prompts.label_ids))
            times.append(time.perf_counter() - t0)
        out["score"] = measured(sizes.num_items / statistics.median(times), times_s=times)
    for key, m in out.items():
        _log(f"kvloom {key}: {m['value']:.1f}")
    return out


# ---- over HTTP (kvloom's server and llama.cpp's) ------------------------------------------------

async def run_bench_quietly(options: Sequence[str]) -> dict:
    """tools.bench.run_bench with its printout swallowed; its JSON summary."""
    from kvloom.tools.bench import run_bench

    parser = argparse.ArgumentParser()
    command_args.add_bench_args(parser)
    with tempfile.TemporaryDirectory(prefix="kvloom-compare-") as tmp:
        path = os.path.join(tmp, "summary.json")
        args = parser.parse_args([*options, "--json", path, "--no-progress"])
        with contextlib.redirect_stdout(io.StringIO()):
            code = await run_bench(args)
        if code == 2 or not os.path.isfile(path):
            raise RuntimeError(f"kvloom bench {' '.join(options)}: exit code {code}")
        with open(path) as f:
            return json.load(f)


async def bench_prompts_over_http(url: str, texts: Sequence[str], max_tokens: int, concurrency: int,
                                  extra_body: dict, timeout_s: float) -> dict:
    """One wave: len(texts) requests of the given prompts, `concurrency` in flight."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="kvloom-compare-", delete=False) as f:
        for text in texts:
            f.write(json.dumps({"prompt": text, "max_tokens": max_tokens}) + "\n")
    try:
        return await run_bench_quietly([
            "--url", url, "--prompts-file", f.name, "--concurrency", str(concurrency),
            "--num-requests", str(len(texts)), "--warmup-requests", "0", "--timeout", str(timeout_s),
            "--extra-body", json.dumps(extra_body)])
    finally:
        os.unlink(f.name)


def _from_summary(summary: dict, value: Optional[float]) -> dict:
    """A figure from a bench summary; None when any request failed (the errors are kept)."""
    if summary["num_errors"]:
        _log(f"{summary['num_errors']} of {summary['num_requests']} requests failed: {summary['errors']}")
        value = None
    return measured(value, duration_s=summary["duration_s"], output_tokens=summary["output_tokens"],
                    input_tokens=summary["input_tokens"], errors=summary["errors"],
                    ttft_p50_ms=summary["ttft_ms"]["p50"], e2e_p50_ms=summary["e2e_ms"]["p50"])


async def bench_http(name: str, url: str, texts: PromptSet, sizes: Sizes, workloads: Sequence[str],
                     extra_body: dict, *, timeout_s: float, score_vocab_size: Optional[int] = None) -> dict:
    """The serving figures through an OpenAI-compatible server; score only where score_vocab_size is
    given (kvloom's /v1/score)."""
    out = {}
    await bench_prompts_over_http(url, texts.warmup[:1], 2, 1, extra_body, timeout_s)
    if "decode" in workloads:
        for c in sizes.concurrency:
            s = await bench_prompts_over_http(url, texts.decode[c], sizes.new_tokens, c, extra_body,
                                              timeout_s)
            out[f"decode@{c}"] = _from_summary(s, s["output_throughput"])
    if "prefill" in workloads:
        s = await bench_prompts_over_http(url, texts.prefill, 1, 1, extra_body, timeout_s)
        ttft_ms = s["ttft_ms"]["p50"]
        out["prefill"] = _from_summary(s, sizes.prefill_tokens / (ttft_ms / 1e3) if ttft_ms else None)
    if "shared-prefix" in workloads:
        s = await bench_prompts_over_http(url, texts.shared, sizes.shared_new_tokens, len(texts.shared),
                                          extra_body, timeout_s)
        out["shared-prefix"] = _from_summary(s, s["output_throughput"])
    if "score" in workloads and score_vocab_size:
        s = await run_bench_quietly([
            "--url", url, "--workload", "score", "--query-tokens", str(sizes.query_tokens),
            "--num-items", str(sizes.num_items), "--item-tokens", str(sizes.item_tokens),
            "--label-token-ids", ",".join(str(i) for i in texts.label_ids),
            "--vocab-size", str(score_vocab_size), "--num-requests", str(sizes.repeats),
            "--warmup-requests", "1", "--timeout", str(timeout_s)])
        out["score"] = _from_summary(s, s["items_per_s"])
    for key, m in out.items():
        _log(f"{name} {key}: {format_value(m['value'], '.1f')}")
    return out


# ---- HF transformers ----------------------------------------------------------------------------

def bench_hf(source, prompts: PromptSet, sizes: Sizes, workloads: Sequence[str]) -> dict:
    """transformers in float32: greedy `generate` of each prompt group as one batch (equal lengths, no
    padding); scoring as one batched forward over the query++item rows."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeerSkipped(f"{' and '.join(missing)} not installed: pip install torch transformers")
    import torch

    from kvloom.tools.bench_engine import load_hf

    _log("loading the model in transformers")
    model = load_hf(source)

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(batch, dtype=torch.long)  # ids: [B, T]
        t0 = time.perf_counter()
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                                pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        wall_s = time.perf_counter() - t0
        if tuple(tokens.shape) != (len(batch), ids.shape[1] + new_tokens):
            raise RuntimeError(f"transformers generated shape {tuple(tokens.shape)}")
        return wall_s

    def timed_batch(batch, new_tokens) -> dict:
        generate(batch, min(2, new_tokens))  # warm-up
        wall_s = generate(batch, new_tokens)
        return measured(len(batch) * new_tokens / wall_s, wall_s=wall_s, num_tokens=len(batch) * new_tokens)

    def score(query, items) -> float:
        ids = torch.tensor([query + item for item in items], dtype=torch.long)  # ids: [N, Q + I]
        t0 = time.perf_counter()
        logits = model(ids, logits_to_keep=1).logits[:, -1]  # logits: [N, V]
        torch.log_softmax(logits.float(), dim=-1)[:, list(prompts.label_ids)]  # [N, L]
        return time.perf_counter() - t0

    out = {}
    with torch.inference_mode():
        if "decode" in workloads:
            for c in sizes.concurrency:
                out[f"decode@{c}"] = timed_batch(prompts.decode[c], sizes.new_tokens)
        if "prefill" in workloads:
            generate(prompts.prefill[:1], 1)  # warm-up
            ttfts = [generate([p], 1) for p in prompts.prefill]
            ttft = statistics.median(ttfts)
            out["prefill"] = measured(sizes.prefill_tokens / ttft, ttft_s=ttft, ttfts_s=ttfts)
        if "shared-prefix" in workloads:
            out["shared-prefix"] = timed_batch(prompts.shared, sizes.shared_new_tokens)
        if "score" in workloads:
            (query, items), *timed = prompts.score
            score(query, items)  # warm-up
            times = [score(q, i) for q, i in timed]
            out["score"] = measured(sizes.num_items / statistics.median(times), times_s=times)
    for key, m in out.items():
        _log(f"transformers {key}: {m['value']:.1f}")
    return out


# ---- llama.cpp's model file ---------------------------------------------------------------------

def _float_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """F16 files keep 1-d tensors (norms) in F32, as llama.cpp's own converter does."""
    return array.astype(np.float16 if dtype == "f16" and array.ndim > 1 else np.float32)


def _file_type(dtype: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert_gguf(path: str, out: str, dtype: str) -> None:
    """A quantized GGUF -> the same file with every tensor dequantized to `dtype` ("f32"/"f16"):
    metadata (tokenizer included) copied verbatim, tensor names and layouts unchanged."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (
                "general.architecture", "general.file_type", "general.quantization_version"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(_file_type(dtype))
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type)  # numpy layout: reversed ggml dims
        writer.add_tensor(tensor.name, _float_array(np.asarray(array, np.float32), dtype))
    _write(writer)


def permute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF q/k rows (two halves per head) -> llama.cpp's interleaved rows; the inverse of the loader's
    _unpermute_rope."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert_hf_dir(path: str, out: str, dtype: str) -> None:
    """A Llama checkpoint directory with a byte-level BPE tokenizer -> a float GGUF (gguf-py's writer)."""
    from pathlib import Path

    import gguf
    from safetensors import safe_open

    from kvloom.engine.config import ConfigError, ModelConfig
    from kvloom.engine.models.loader import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES

    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    except (OSError, ValueError, ConfigError) as exc:
        raise ConversionError(f"config.json: {exc}") from None
    if cfg.architecture != "LlamaForCausalLM" or cfg.rope_scaling.kind != "default" or cfg.attention_bias:
        raise ConversionError(f"{cfg.architecture} with rope {cfg.rope_scaling.kind}: only plain Llama "
                              "checkpoint directories are converted here")
    try:
        vocab = gguf.BpeVocab(Path(path))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConversionError(f"tokenizer: not a byte-level BPE tokenizer.json ({exc})") from None
    tokens, token_types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text)
        token_types.append(token_type)
    for i in range(len(tokens), cfg.vocab_size):  # embedding rows past the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        token_types.append(gguf.TokenType.UNUSED)

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(os.path.basename(path.rstrip(os.sep)))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(dtype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(Path(path), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    hf_to_gguf = {hf: name for name, hf in GGUF_GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        hf_to_gguf.update({f"model.layers.{i}.{hf}": f"blk.{i}.{name}"
                           for name, hf in GGUF_LAYER_NAMES.items()})
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ConversionError(f"{path}: no *.safetensors files")
    written = set()
    for file in files:
        handle = safe_open(os.path.join(path, file), framework="flax")
        for key in sorted(handle.keys()):
            name = hf_to_gguf.get(key)
            if name is None:  # rotary buffers and the like
                continue
            array = np.asarray(handle.get_tensor(key).astype("float32"))
            if key.endswith("self_attn.q_proj.weight"):
                array = permute_rope(array, cfg.num_heads)
            elif key.endswith("self_attn.k_proj.weight"):
                array = permute_rope(array, cfg.num_kv_heads)
            writer.add_tensor(name, _float_array(array, dtype))
            written.add(name)
    if cfg.tie_word_embeddings:
        written.add("output.weight")
    missing = sorted(set(hf_to_gguf.values()) - written)
    if missing:
        raise ConversionError(f"{path}: missing tensors for {', '.join(missing[:3])}")
    _write(writer)


def _fingerprint(path: str) -> str:
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns)
             for f in files if os.path.isfile(f)]
    return hashlib.sha256(repr((os.path.abspath(path), stats, CONVERTER_VERSION)).encode()).hexdigest()[:16]


def float_gguf(source, dtype: str, cache_dir: str) -> str:
    """The model as a GGUF of `dtype` ("f32"/"f16") tensors, converted once into cache_dir."""
    name = f"{source.name}-{_fingerprint(source.path)}.{dtype}.gguf"
    out = os.path.join(os.path.expanduser(cache_dir), name)
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    partial = f"{out}.partial-{os.getpid()}"
    _log(f"converting {source.path} to an {dtype.upper()} GGUF for llama.cpp")
    try:
        (convert_gguf if source.is_gguf else convert_hf_dir)(source.path, partial, dtype)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out


def gguf_file_type_name(path: str) -> str:
    """"Q4_1" for a MOSTLY_Q4_1 file; "GGUF" when the file does not say."""
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get("general.file_type")
        name = gguf.LlamaFileType(int(field.contents())).name if field is not None else "GGUF"
    except Exception:  # noqa: BLE001 - a label only
        return "GGUF"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


# ---- llama.cpp ----------------------------------------------------------------------------------

def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        reason = "" if isinstance(exc, ModuleNotFoundError) and exc.name == "llama_cpp" else f" ({exc})"
        raise PeerSkipped(f"llama-cpp-python is not installed{reason}: {INSTALL_HINT}") from None
    except OSError as exc:  # the shared library failed to load
        raise PeerSkipped(f"llama-cpp-python does not load: {exc}") from None
    return llama_cpp


def bench_llamacpp(model_path: str, prompts: PromptSet, sizes: Sizes, workloads: Sequence[str],
                   num_threads: int, tokenizer_probe: tuple[str, list[int]]) -> dict:
    """llama-cpp-python in process, greedy, one sequence at a time. The number of generated tokens is
    the usage it reports (EOS is not suppressed: llama-cpp-python has no ignore_eos)."""
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=sizes.max_context + 16, n_batch=512,
                          n_threads=num_threads, n_threads_batch=num_threads, logits_all=False, verbose=False)
    text, ids = tokenizer_probe
    is_same_tokenizer = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) == ids
    if not is_same_tokenizer:
        _log("llama.cpp tokenizes differently from kvloom; the prompts are given as kvloom's token ids")

    def complete(prompt: list[int], max_tokens: int) -> int:
        out = llm.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
        return int(out["usage"]["completion_tokens"])

    def back_to_back(batch: list[list[int]], max_tokens: int) -> dict:
        llm.reset()
        t0 = time.perf_counter()
        num_tokens = sum(complete(p, max_tokens) for p in batch)
        wall_s = time.perf_counter() - t0
        return measured(num_tokens / wall_s, wall_s=wall_s, num_tokens=num_tokens,
                        requested_tokens=len(batch) * max_tokens)

    def score(query: list[int], items: list[list[int]]) -> float:
        """The query once, then each item after it (n_tokens rewound: eval drops the KV past it)."""
        t0 = time.perf_counter()
        llm.reset()
        llm.eval(query)
        for item in items:
            llm.n_tokens = len(query)
            llm.eval(item)
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))  # logits: [V]
            label_logprobs(logits, prompts.label_ids)
        return time.perf_counter() - t0

    out = {}
    complete(prompts.warmup[0], 2)
    if "decode" in workloads:
        for c in sizes.concurrency:
            out[f"decode@{c}"] = back_to_back(prompts.decode[c], sizes.new_tokens)
    if "prefill" in workloads:
        ttfts = []
        for p in prompts.prefill:
            llm.reset()
            t0 = time.perf_counter()
            complete(p, 1)
            ttfts.append(time.perf_counter() - t0)
        ttft = statistics.median(ttfts)
        out["prefill"] = measured(sizes.prefill_tokens / ttft, ttft_s=ttft, ttfts_s=ttfts)
    if "shared-prefix" in workloads:
        out["shared-prefix"] = back_to_back(prompts.shared, sizes.shared_new_tokens)
    if "score" in workloads:
        (query, items), *timed = prompts.score
        score(query, items)  # warm-up
        times = [score(q, i) for q, i in timed]
        out["score"] = measured(sizes.num_items / statistics.median(times), times_s=times)
    for m in out.values():
        m["same_tokenizer"] = is_same_tokenizer
    for key, m in out.items():
        _log(f"llama.cpp {key}: {m['value']:.1f}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_until_serving(url: str, proc: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PeerSkipped(f"the llama.cpp server exited with code {proc.returncode}: "
                                  f"{_last_line(log_path)}")
            try:
                async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)  # polling a child process that has no readiness signal
    raise PeerSkipped(f"the llama.cpp server did not answer within {timeout_s:.0f}s: {_last_line(log_path)}")


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:200] if lines else "(no output)"


def check_llamacpp_server() -> None:
    """Raises PeerSkipped unless `python -m llama_cpp.server` can import what it needs."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise PeerSkipped(f"llama-cpp-python is not installed: {INSTALL_HINT}")
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise PeerSkipped(f"llama-cpp-python's server needs {', '.join(missing)}: {INSTALL_HINT}")


@contextlib.asynccontextmanager
async def llamacpp_server(model_path: str, n_ctx: int, num_threads: int, start_timeout_s: float):
    """`python -m llama_cpp.server` on a free loopback port; yields its base URL, stops it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_batch", "512", "--n_threads", str(num_threads),
           "--n_threads_batch", str(num_threads), "--logits_all", "false", "--interrupt_requests", "false",
           "--verbose", "false"]
    with tempfile.TemporaryDirectory(prefix="kvloom-compare-") as tmp:
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            await _wait_until_serving(url, proc, log_path, start_timeout_s)
            _log(f"llama.cpp server (pid {proc.pid}) on {url}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- the report ---------------------------------------------------------------------------------

def peer_label(peer: str, gguf_tag: str = "") -> str:
    base = {"hf": "transformers", "llamacpp": "llama.cpp", "llamacpp-server": "llama.cpp-server"}[peer]
    return f"{base} {gguf_tag}".strip()


def build_rows(figs: Sequence[Figure], measurements: dict, peers: Sequence[str]) -> list[dict]:
    """One row per figure and mode that has any value: kvloom's, each peer's in the same mode (None for
    the other mode and for a peer that did not run), the ratios kvloom/peer and kvloom/roofline."""
    rows = []
    for fig in figs:
        for mode, kvloom_system in ((IN_PROCESS, "kvloom"), (HTTP, "kvloom-http")):
            kvloom = measurements.get(kvloom_system, {}).get(fig.key, {}).get("value")
            values = {p: measurements.get(p, {}).get(fig.key, {}).get("value") for p in peers
                      if PEER_MODES[p] == mode}
            values.update({p: None for p in peers if p not in values})
            if kvloom is None and all(v is None for v in values.values()):
                continue
            rows.append(dict(figure=f"{fig.label} ({mode})", key=fig.key, workload=fig.workload, mode=mode,
                             unit=fig.unit, kvloom=kvloom, peers=values,
                             kvloom_over_peer={p: ratio(kvloom, v) for p, v in values.items()},
                             roofline=fig.roofline, kvloom_over_roofline=ratio(kvloom, fig.roofline)))
    return rows


def table_cells(rows: Sequence[dict], labels: dict[str, str]) -> list[list[str]]:
    """Header + one line of cells per row; `labels`: the peers shown, name -> column title."""
    header = ["figure", "kvloom", *labels.values(), *[f"kvloom/{t}" for t in labels.values()],
              "kvloom/roofline", "roofline"]
    cells = [header]
    for row in rows:
        fraction = row["kvloom_over_roofline"]
        cells.append([row["figure"], format_value(row["kvloom"], ".1f"),
                      *[format_value(row["peers"].get(p), ".1f") for p in labels],
                      *[format_value(row["kvloom_over_peer"].get(p), ".2f", "x") for p in labels],
                      format_value(None if fraction is None else 100 * fraction, ".1f", "%"),
                      format_value(row["roofline"], ".1f")])
    return cells


def format_table(cells: Sequence[Sequence[str]]) -> list[str]:
    """The first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
            .rstrip() for line in cells]


def report_lines(report: dict) -> list[str]:
    roof = report["roofline"]
    shown = {p: s["label"] for p, s in report["peers"].items() if s["status"] == "ok"}
    lines = [f"kvloom compare: {report['model']} ({report['num_parameters'] / 1e6:.1f}M params, float32, "
             f"{report['cpu_count']} CPUs)",
             f"machine: float32 matmul peak {roof['peak_gflops']:.1f} GFLOP/s, memory bandwidth "
             f"{roof['bandwidth_gb_s']:.2f} GB/s",
             f"roofline: compute {roof['compute_tok_s']:.1f} tok/s (peak / 2 x params); decode at batch B "
             f"also <= B x {roof['memory_tok_s_batch1']:.1f} tok/s (bandwidth / params x 4 B)",
             ""]
    lines += format_table(table_cells(report["rows"], shown))
    for peer, status in report["peers"].items():
        if status["status"] != "ok":
            lines.append(f"{status['status']}: {status['label']}: {status['message']}")
    if "llamacpp" in shown or "llamacpp-server" in shown:
        lines.append("note: llama-cpp-python runs one sequence at a time: its @C figures are C requests "
                     "in turn")
    return lines


def _log(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr, flush=True)


# ---- the run ------------------------------------------------------------------------------------

async def measure_kvloom(args, sizes: Sizes, workloads: Sequence[str]) -> dict:
    """Start the engine once: the in-process figures, then the same engine over HTTP. Returns the
    model's facts and both prompt sets (the peers run the same prompts)."""
    from kvloom.api.server import create_app, start_server
    from kvloom.engine.engine import Engine

    _log("starting the kvloom engine (compiles every step shape; about a minute cold)")
    async with Engine(engine_config(args, sizes)) as engine:
        if not engine.is_ready:
            raise RuntimeError(f"the engine is not ready: {engine.state_detail}")
        tokenizer = engine.tokenizer

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        rng = np.random.default_rng(args.seed)
        in_process = build_prompt_set(encode, rng, sizes)
        over_http = as_text(build_prompt_set(encode, rng, sizes), tokenizer.decode)  # fresh prefixes
        probe_text = " ".join(WORDS[:32])
        facts = dict(model=engine.model_name, source=engine.runner.source,
                     num_parameters=engine.runner.model_config.num_parameters,
                     vocab_size=engine.runner.vocab_size, engine_config=engine.status()["config"],
                     in_process=in_process, over_http=over_http,
                     tokenizer_probe=(probe_text, encode(probe_text)))
        measurements = {"kvloom": await bench_kvloom_engine(engine, in_process, sizes, workloads)}
        if args.http and workloads:
            runner, url = await start_server(create_app(engine))
            try:
                extra_body = {"temperature": 0.0, "ignore_eos": True}
                measurements["kvloom-http"] = await bench_http(
                    "kvloom over HTTP", url, over_http, sizes, workloads, extra_body,
                    timeout_s=args.request_timeout, score_vocab_size=engine.runner.vocab_size)
            finally:
                await runner.cleanup()
    return dict(facts, measurements=measurements)


class LlamaCppModelFile:
    """The GGUF llama.cpp runs, made once for both llama.cpp peers: the float conversion, or the
    original file (labelled with its quantization) when converting is not possible or not asked."""

    def __init__(self, source, dtype: str, cache_dir: str):
        self.source, self.dtype, self.cache_dir = source, dtype, cache_dir
        self._made: Optional[tuple[str, str, Optional[str]]] = None

    def get(self) -> tuple[str, str, Optional[str]]:
        """(path, tag for the column title, note)."""
        if self._made is None:
            self._made = self._make()
        return self._made

    def _make(self):
        if self.dtype != "original":
            try:
                return float_gguf(self.source, self.dtype, self.cache_dir), self.dtype.upper(), None
            except Exception as exc:  # noqa: BLE001 - fall back to the original file below
                if not self.source.is_gguf:
                    raise PeerSkipped(f"cannot convert {self.source.path} to a GGUF: {exc}") from None
                note = f"conversion to {self.dtype.upper()} failed ({type(exc).__name__}: {exc}); " \
                       "running the original file"
                _log(note)
                return self.source.path, f"({gguf_file_type_name(self.source.path)})", note
        if not self.source.is_gguf:
            raise PeerSkipped("--llamacpp-gguf original needs a .gguf model")
        return self.source.path, f"({gguf_file_type_name(self.source.path)})", None


async def run_peer(peer: str, args, sizes: Sizes, workloads: Sequence[str], kvloom: dict,
                   model_file: LlamaCppModelFile) -> tuple[dict, str, Optional[str]]:
    """(measurements, column tag, note) of one peer; raises PeerSkipped."""
    if peer == "hf":
        return bench_hf(kvloom["source"], kvloom["in_process"], sizes, workloads), "", None
    if peer == "llamacpp":
        import_llama_cpp()  # before converting: a missing package skips at once
        path, tag, note = model_file.get()
        return bench_llamacpp(path, kvloom["in_process"], sizes, workloads, args.llamacpp_threads,
                              kvloom["tokenizer_probe"]), tag, note
    serving = [w for w in workloads if w != "score"]  # llama.cpp's server has no /v1/score
    check_llamacpp_server()  # before converting: a missing package skips at once
    path, tag, note = model_file.get()
    async with llamacpp_server(path, sizes.max_context + 16, args.llamacpp_threads,
                               args.server_start_timeout) as url:
        out = await bench_http("llama.cpp server", url, kvloom["over_http"], sizes, serving,
                               {"temperature": 0.0, "repeat_penalty": 1.0}, timeout_s=args.request_timeout)
    return out, tag, note


async def run_compare(args) -> dict:
    sizes = sizes_from_args(args)
    workloads, peers = args.workloads, args.peers
    use_compile_cache(args.compile_cache)

    from kvloom.tools.bench_engine import measure_matmul_peak

    _log("measuring the machine: float32 matmul peak and memory bandwidth")
    matmul = measure_matmul_peak(sizes.matmul_sizes, sizes.matmul_repeats)
    bandwidth = measure_bandwidth(sizes.copy_mib * 2**20, max(3, sizes.matmul_repeats))

    kvloom = await measure_kvloom(args, sizes, workloads)  # the engine is stopped on return
    measurements = kvloom["measurements"]
    statuses = {}
    model_file = LlamaCppModelFile(kvloom["source"], args.llamacpp_gguf, args.gguf_cache_dir)
    for peer in peers:
        def status(kind: str, message: Optional[str], tag: str = "") -> dict:
            return dict(label=peer_label(peer, tag), mode=PEER_MODES[peer], status=kind, message=message)

        try:
            measurements[peer], tag, note = await run_peer(peer, args, sizes, workloads, kvloom, model_file)
            statuses[peer] = status("ok", note, tag)
        except PeerSkipped as exc:
            statuses[peer] = status("skipped", str(exc))
            _log(f"skipping {peer_label(peer)}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one failing peer must not lose the others' figures
            statuses[peer] = status("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            _log(f"{peer_label(peer)} failed: {statuses[peer]['message']}")

    roof = Roofline(matmul["peak_gflops"] * 1e9, bandwidth["bytes_per_s"], kvloom["num_parameters"])
    figs = figures(sizes, workloads, roof)
    return dict(
        model=kvloom["model"], source=kvloom["source"].path, num_parameters=kvloom["num_parameters"],
        dtype="float32", cpu_count=os.cpu_count(), workloads=list(workloads), peers=statuses,
        settings=dict(dataclasses.asdict(sizes), quick=args.quick, seed=args.seed, http=args.http,
                      llamacpp_gguf=args.llamacpp_gguf, llamacpp_threads=args.llamacpp_threads),
        engine_config=kvloom["engine_config"], machine=dict(matmul=matmul, bandwidth=bandwidth),
        roofline=roof.to_json(), rows=build_rows(figs, measurements, peers), measurements=measurements)


def main_from_args(args) -> int:
    """Exit code 0 whatever peers were skipped; 2 for bad options, 1 when kvloom itself cannot run."""
    sizes = sizes_from_args(args)
    bad = [name for name, value in dataclasses.asdict(sizes).items()
           if any(v <= 0 for v in (value if isinstance(value, tuple) else (value,)))]
    if bad:
        print(f"kvloom compare: error: must be positive: {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_compare(args))
    except Exception as exc:  # noqa: BLE001 - kvloom itself failed: report it and exit 1
        traceback.print_exc()
        print(f"kvloom compare: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(report)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvloom compare", description=__doc__.split("\n\n")[0])
    command_args.add_compare_args(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
