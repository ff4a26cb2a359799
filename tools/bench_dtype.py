"""Precision as a choice: for each (weights dtype, KV cache dtype), accuracy against transformers in
float32 and decode speed, one engine per combination.

    .venv/bin/python -m kvloom.tools.bench_dtype [--model PATH] [--combos float32:auto,bfloat16:auto,...]
        [--new-tokens 64] [--speed-tokens 64] [--batch 32] [--json OUT.json]

Per combination:
  1. logits: each prompt's logits at every position (engine.offline, the serving forward) beside HF
     transformers' float32 ones: max |delta logit| over all prompts and positions.
  2. greedy: an Engine (the serving path) continues each prompt greedily for --new-tokens tokens
     (ignore_eos) beside HF `generate`: how many prompts agree on every token, and the mean number of
     leading tokens that agree.
  3. speed: the same Engine, decode tok/s of one request and of --batch requests submitted at once
     (tools.bench_engine.run_batch: new tokens / wall time, prefill included), each run once untimed
     first so that nothing compiles while timed.
  4. weight reads: per weights dtype, the bytes/s the model's one-row product reads weights at in that
     dtype, through the CPU kernel where the engine uses it (tools.machine.measure_weight_reads over
     --probe-mib MiB): what bounds single-stream decode.
The prompts are chat questions through the model's template. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from kvloom.tools.bench_engine import ready_engine, run_batch
from kvloom.tools.machine import measure_weight_reads
from kvloom.tools.engine_args import (add_compile_cache_arg, add_model_args, engine_config_from_args,
                                      report_config_errors, use_compile_cache)
from kvloom.tools.report import format_table, format_value, log, print_figures, publish
from kvloom.tools.workload import prompt_id_range, random_prompts

DEFAULT_COMBOS = "float32:auto,float32:bfloat16,float32:float16,bfloat16:auto,bfloat16:float32,float16:auto"
QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a binary search does.", "List three uses of copper.")


def _log(message: str) -> None:
    log("bench_dtype", message)


def parse_combos(text: str) -> list[tuple[str, str]]:
    """"float32:auto,bfloat16:float32" -> [("float32", "auto"), ("bfloat16", "float32")]; each checked by
    EngineConfig (a ConfigError names the bad field)."""
    from kvloom.engine.config import EngineConfig

    combos = []
    for item in text.split(","):
        dtype, _, kv = item.strip().partition(":")
        EngineConfig(dtype=dtype, kv_cache_dtype=kv or "auto")
        combos.append((dtype, kv or "auto"))
    return combos


def hf_reference(source, prompts: list[list[int]], new_tokens: int) -> dict:
    """transformers in float32: each prompt's logits [len, V] and its greedy continuation."""
    import torch

    from kvloom.tools.peers import load_hf

    model = load_hf(source)
    logits, greedy = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(model(ids).logits[0].float().numpy())
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                                 pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            greedy.append(out[0, len(prompt):].tolist())
    return dict(logits=logits, greedy=greedy)


def logits_error(model, dtype: str, kv_dtype: str, prompts: list[list[int]], reference: list) -> float:
    """max |kvloom logits - HF float32 logits| over every prompt position."""
    from kvloom.engine.models.loader import load_model
    from kvloom.engine.offline import StaticBatch

    _, cfg, params = load_model(model, dtype)
    worst = 0.0
    for prompt, ref in zip(prompts, reference):
        batch = StaticBatch(cfg, params, num_seqs=1, max_len=len(prompt), page_size=16,
                            kv_dtype=None if kv_dtype == "auto" else kv_dtype)
        worst = max(worst, float(np.abs(batch.extend([prompt]) - ref).max()))
    return worst


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Prompts whose continuations agree on every token, and the mean length of the agreeing prefix."""
    prefixes = []
    for a, b in zip(ours, theirs):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same)
    return dict(identical=sum(p == len(b) for p, b in zip(prefixes, theirs)), prompts=len(theirs),
                mean_prefix=float(np.mean(prefixes)))


async def greedy_and_speed(config, prompts: list[list[int]], args) -> dict:
    from kvloom.engine.request import SamplingParams

    async with ready_engine(config) as (engine, start_s):
        greedy = []
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        for prompt in prompts:
            greedy.append([t async for out in engine.generate(prompt, params) for t in out.token_ids])
        rng = np.random.default_rng(args.seed)
        batch = random_prompts(rng, args.batch, 32, prompt_id_range(engine.runner.vocab_size))
        speed = {}
        for name, group in (("single", batch[:1]), ("batch", batch)):
            await run_batch(engine, group, args.speed_tokens)  # untimed: whatever compiles, compiles here
            speed[name] = (await run_batch(engine, group, args.speed_tokens))["tok_s"]
        plan = engine.status()["kv_cache"]
        return dict(greedy=greedy, start_s=start_s, single_tok_s=speed["single"], batch_tok_s=speed["batch"],
                    kv_bytes_per_token=plan["num_bytes"] // plan["num_tokens"])


def measure(args) -> dict:
    from kvloom.engine.models.source import resolve_source
    from kvloom.engine.tokenizer import Tokenizer

    source = resolve_source(args.model)
    tokenizer = Tokenizer.load(source)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    _log("transformers float32: logits and greedy continuations")
    reference = hf_reference(source, prompts, args.new_tokens)
    rows, reads = [], {}
    for dtype, kv in args.combos:
        if dtype not in reads:
            reads[dtype] = measure_weight_reads(dtype, args.probe_mib << 20, 3)["bytes_per_s"]
        _log(f"weights {dtype}, KV cache {kv}")
        t0 = time.perf_counter()
        error = logits_error(args.model, dtype, kv, prompts, reference["logits"])
        config = engine_config_from_args(args, dtype=dtype, kv_cache_dtype=kv, max_running=args.batch,
                                         max_model_len=1024).replace(warmup=False)
        ours = asyncio.run(greedy_and_speed(config, prompts, args))
        rows.append(dict(dtype=dtype, kv_cache_dtype=config.resolved_kv_cache_dtype,
                         max_abs_logit_error=error, greedy=agreement(ours.pop("greedy"), reference["greedy"]),
                         weight_read_bytes_per_s=reads[dtype],
                         seconds=time.perf_counter() - t0, **ours))
        _log(f"  max |dlogit| {error:.4f}, decode {rows[-1]['single_tok_s']:.1f} / "
             f"{rows[-1]['batch_tok_s']:.1f} tok/s")
    return dict(model=source.name, new_tokens=args.new_tokens, speed_tokens=args.speed_tokens,
                batch=args.batch, prompts=len(prompts), rows=rows)


def print_report(report: dict) -> None:
    head = ("weights", "KV cache", "max |dlogit|", f"greedy = HF ({report['new_tokens']} tok)",
            "agreeing prefix", "decode tok/s @1", f"decode tok/s @{report['batch']}", "KV bytes/token",
            "weight reads GB/s")
    cells = [head] + [
        (r["dtype"], r["kv_cache_dtype"], format_value(r["max_abs_logit_error"], ".4f"),
         f"{r['greedy']['identical']}/{r['greedy']['prompts']}",
         format_value(r["greedy"]["mean_prefix"], ".1f"), format_value(r["single_tok_s"], ".1f"),
         format_value(r["batch_tok_s"], ".1f"), str(r["kv_bytes_per_token"]),
         format_value(r["weight_read_bytes_per_s"] / 1e9, ".1f"))
        for r in report["rows"]]
    print_figures(f"kvloom precision: {report['model']} against transformers float32 "
                  f"({report['prompts']} chat prompts)", format_table(cells, num_left=2),
                  [f"decode tok/s: {report['speed_tokens']} new tokens per request over the wall time, "
                   f"prefill included",
                   "weight reads: bytes/s of the model's one-row product in the weights' dtype "
                   "(what bounds decode @1)"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, with_dtype=False)
    p.add_argument("--combos", type=parse_combos, default=parse_combos(DEFAULT_COMBOS),
                   help=f"weights:kv-cache dtype pairs (default {DEFAULT_COMBOS})")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens compared with transformers")
    p.add_argument("--speed-tokens", type=int, default=64, help="new tokens per request when timing decode")
    p.add_argument("--batch", type=int, default=32, help="requests at once for the batch decode figure")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the batch's random prompts")
    p.add_argument("--probe-mib", type=int, default=256, help="weights read by the matvec probe, per dtype")
    p.add_argument("--json", default=None, help="write every figure to this file")
    add_compile_cache_arg(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("new_tokens", "speed_tokens", "batch", "probe_mib"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be positive")
    use_compile_cache(args.compile_cache)
    return publish(measure(args), print_report, args.json, "bench_dtype")


if __name__ == "__main__":
    report_config_errors("python -m kvloom.tools.bench_dtype", main)
