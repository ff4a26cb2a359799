"""Engine-level figures for one model in float32 (or --dtype bfloat16), kvloom beside HF transformers
(float32) in the same run: aggregate decode throughput at several concurrencies, time to first token
cold and from the prefix cache, and decode throughput as a fraction of the machine's compute roofline
in that dtype.

    .venv/bin/python -m kvloom.tools.bench_engine [--model PATH] [--dtype float32|bfloat16]
        [--concurrency 1,8,32] [--new-tokens 128] [--prompt-tokens 32] [--long-prompt-tokens 1500]
        [--hf/--no-hf] [--json OUT.json]

Phases, each with a fixed number of requests:
  1. throughput: per concurrency C, C requests of random prompts submitted at once to a started
     Engine; tokens/s = C * new_tokens / wall time of the whole batch (prefill included).
     HF `model.generate` runs the same prompts as one batch of C.
  2. TTFT (max_tokens=1, submit -> first output): a never-seen prompt (cold), then the same prompt
     again once the first finished (cached by the radix prefix cache), for a short and a long prompt.
  3. roofline: the best jitted `jnp.dot` GFLOP/s in the run's dtype over a few square sizes; roofline
     tokens/s = peak / (2 * num_parameters), compared with decode at the highest concurrency.
The spec's targets are printed beside the figures for context; nothing is asserted.

    .venv/bin/python -m kvloom.tools.bench_engine --compare-speculative [--speculative ngram
        --num-speculative-tokens 4] [--new-tokens 256]

instead measures speculative decoding, single stream (max_running 1 unless given): the same greedy
chat requests (a "repeat this passage" workload and open questions, tools.workload) one at a time,
alternately on an engine without speculation and one with it; tokens/s of each (prefill included), the
speed-up, the tokens a verify step yielded on average, the acceptance rate, and whether the tokens were
identical.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Optional, Sequence

import numpy as np

from kvloom.tools.machine import measure_matmul_peak, roofline_tokens_per_s
from kvloom.tools.peers import TransformersSystem
from kvloom.tools.command_args import parse_int_list
from kvloom.tools.report import format_table, format_value, log, print_figures, publish, ratio
from kvloom.tools.workload import prompt_id_range, random_prompts, speculative_workloads
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, report_config_errors,
                                      use_compile_cache)

TARGETS = {
    "single_stream": ">= 1.5x HF single-stream",
    "concurrent_32": ">= 3x HF at 32 concurrent",
    "roofline_32": ">= 60% of roofline at 32 concurrent",
    "cached_ttft_1500": "cached 1500-token TTFT >= 10x faster than cold",
}


# ---- pure helpers -------------------------------------------------------------------------------

def throughput_target(concurrency: int) -> str:
    return {1: TARGETS["single_stream"], 32: TARGETS["concurrent_32"]}.get(concurrency, "")


def ttft_target(prompt_tokens: int) -> str:
    return TARGETS["cached_ttft_1500"] if prompt_tokens == 1500 else ""


# (name, width, alignment); the last column is free text.
COLUMNS = (("figure", 34, "<"), ("kvloom", 12, ">"), ("transformers", 14, ">"), ("ratio", 10, ">"),
           ("target", 0, "<"))


def format_row(cells: Sequence[str]) -> str:
    parts = [f"{cell:{align}{width}}" if width else f"  {cell}"
             for cell, (_, width, align) in zip(cells, COLUMNS)]
    return "".join(parts).rstrip()


def table_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """The printed table: one row per throughput level, two per TTFT prompt length."""
    rows = [tuple(name for name, _, _ in COLUMNS)]
    for t in report["throughput"]:
        rows.append((f"decode tok/s @{t['concurrency']} concurrent", format_value(t["kvloom_tok_s"]),
                     format_value(t["hf_tok_s"]), format_value(t["ratio"], suffix="x"), t["target"]))
    for t in report["ttft"]:
        n = t["prompt_tokens"]
        rows.append((f"TTFT {n}-tok cold (ms)", format_value(t["cold_s"] * 1e3), "-", "", ""))
        target = (t["target"] + " (ratio = cold/cached)").lstrip()
        figure = f"TTFT {n}-tok cached (ms, {t['cached_tokens']} cached)"
        cached_ms = format_value(t["cached_s"] * 1e3)
        rows.append((figure, cached_ms, "-", format_value(t["ratio"], suffix="x"), target))
    return rows


def roofline_lines(report: dict) -> list[str]:
    m, r = report["matmul"], report["roofline"]
    sizes = ",".join(str(n) for n in m["sizes"])
    return [
        f"{m['dtype']} matmul peak (jitted jnp.dot, n={sizes}, best of {m['repeats']}): "
        f"{m['peak_gflops']:.1f} GFLOP/s",
        f"roofline decode = peak / (2 x {report['num_parameters'] / 1e6:.1f}M params) "
        f"= {r['tok_s']:.1f} tok/s",
        f"kvloom decode @{r['concurrency']} concurrent: {r['decode_tok_s']:.1f} tok/s = "
        f"{100 * r['fraction']:.1f}% of roofline   (target: {r['target']})",
    ]


def print_report(report: dict, file=None) -> None:
    print_figures(f"kvloom engine benchmark: {report['model']} ({report['dtype']}, "
                  f"{report['num_parameters'] / 1e6:.1f}M params)",
                  [format_row(row) for row in table_rows(report)], roofline_lines(report), file)


def _log(message: str) -> None:
    log("bench_engine", message)


# ---- measurements -------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def ready_engine(config):
    """A started Engine, READY (else RuntimeError), with the seconds it took to start; stopped on exit."""
    from kvloom.engine.engine import Engine

    t0 = time.perf_counter()
    async with Engine(config) as engine:
        if not engine.is_ready:
            raise RuntimeError(f"the engine is not ready: {engine.state_detail}")
        yield engine, time.perf_counter() - t0


async def run_batch(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Submit every prompt at once, drain every stream; wall time covers prefill and decode."""
    from kvloom.engine.request import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def drain(stream) -> int:
        num_tokens = 0
        async for out in stream:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            num_tokens += len(out.token_ids)
        return num_tokens

    t0 = time.perf_counter()
    streams = [engine.generate(p, params) for p in prompts]  # all queued before the engine loop runs
    counts = await asyncio.gather(*(drain(s) for s in streams))
    wall_s = time.perf_counter() - t0
    if sum(counts) != len(prompts) * new_tokens:
        raise RuntimeError(f"expected {len(prompts)} x {new_tokens} tokens, got {counts}")
    return dict(wall_s=wall_s, tok_s=sum(counts) / wall_s)


async def time_to_first_token(engine, prompt: list[int]) -> tuple[float, int]:
    """(seconds from submission to the first output, prompt tokens served by the prefix cache)."""
    from kvloom.engine.request import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first_s = None
    async for out in engine.generate(prompt, params):
        if first_s is None:
            first_s = time.perf_counter() - t0
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        if out.finished:
            return first_s, out.usage.cached_tokens
    raise RuntimeError("the stream ended without a finished output")


async def measure_ttft(engine, rng, id_range, prompt_tokens: int, repeats: int) -> dict:
    """`repeats` fresh prompts, each timed cold and then again cached; medians reported."""
    runs = []
    for _ in range(repeats):
        prompt = random_prompts(rng, 1, prompt_tokens, id_range)[0]
        cold_s, cold_cached = await time_to_first_token(engine, prompt)
        cached_s, cached = await time_to_first_token(engine, prompt)
        runs.append(dict(cold_s=cold_s, cold_cached_tokens=cold_cached,
                         cached_s=cached_s, cached_tokens=cached))
    cold_s = statistics.median(r["cold_s"] for r in runs)
    cached_s = statistics.median(r["cached_s"] for r in runs)
    return dict(prompt_tokens=prompt_tokens, cold_s=cold_s, cached_s=cached_s,
                cold_cached_tokens=min(r["cold_cached_tokens"] for r in runs),
                cached_tokens=min(r["cached_tokens"] for r in runs),
                ratio=ratio(cold_s, cached_s), target=ttft_target(prompt_tokens), runs=runs)


async def bench_kvloom(config, args) -> dict:
    """Start one engine; run the throughput levels, then the TTFT probes. Returns the prompts too, for HF."""
    _log("starting the engine (compiles every step shape; about a minute cold)")
    async with ready_engine(config) as (engine, start_s):
        rng = np.random.default_rng(args.seed)
        id_range = prompt_id_range(engine.runner.vocab_size)
        prompt_sets = {c: random_prompts(rng, c, args.prompt_tokens, id_range) for c in args.concurrency}
        top = max(args.concurrency)
        _log(f"warm-up batch of {top} requests")
        warmup_prompts = random_prompts(rng, top, args.prompt_tokens, id_range)
        await run_batch(engine, warmup_prompts, min(2, args.new_tokens))
        throughput = {}
        for c in args.concurrency:
            throughput[c] = await run_batch(engine, prompt_sets[c], args.new_tokens)
            _log(f"kvloom @{c}: {throughput[c]['tok_s']:.1f} tok/s")
        ttft = []
        for n in (args.prompt_tokens, args.long_prompt_tokens):
            ttft.append(await measure_ttft(engine, rng, id_range, n, args.ttft_repeats))
            cold_ms, cached_ms = ttft[-1]["cold_s"] * 1e3, ttft[-1]["cached_s"] * 1e3
            _log(f"TTFT {n} tokens: cold {cold_ms:.1f} ms, cached {cached_ms:.1f} ms")
        status = engine.status()
        return dict(model=engine.model_name, source=engine.runner.source,
                    num_parameters=engine.runner.model_config.num_parameters,
                    engine_config=status["config"], parallel=status["parallel"], start_s=start_s,
                    prompt_sets=prompt_sets, throughput=throughput, ttft=ttft)


def bench_hf(source, prompt_sets: dict[int, list[list[int]]], new_tokens: int) -> dict[int, dict]:
    """Greedy `generate` of each concurrency's prompts as one batch (tools.peers.TransformersSystem)."""
    hf = TransformersSystem(source)
    out = {}
    for c, prompts in prompt_sets.items():
        m = asyncio.run(hf.batch(prompts, new_tokens))
        out[c] = dict(wall_s=m["wall_s"], tok_s=m["value"])
        _log(f"transformers @{c}: {out[c]['tok_s']:.1f} tok/s")
    return out


# ---- speculative decoding -----------------------------------------------------------------------

async def generate_ids(engine, messages: list[dict], new_tokens: int) -> tuple[list[int], float]:
    """One greedy chat request: its token ids and its wall time (prefill included)."""
    from kvloom.engine.request import SamplingParams

    ids, t0 = [], time.perf_counter()
    async for out in engine.generate(messages=messages,
                                     params=SamplingParams(max_tokens=new_tokens, temperature=0.0)):
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        ids += out.token_ids
    return ids, time.perf_counter() - t0


async def bench_speculative(config, args) -> dict:
    """Two engines, without speculative decoding and with it (the flags' method, else ngram); each
    workload's requests one at a time, alternating between the engines, so that a change in the
    machine's load weighs on both."""
    from kvloom.engine.config import SpeculativeConfig

    spec = config.speculative if config.speculative.enabled else \
        dataclasses.replace(config.speculative, method="ngram")
    _log(f"starting two engines, without and with speculative decoding ({spec.method}, "
         f"k={spec.num_speculative_tokens})")
    async with ready_engine(config.replace(speculative=SpeculativeConfig())) as (plain, _), \
            ready_engine(config.replace(speculative=spec)) as (ours, _):
        for engine in (plain, ours):
            await generate_ids(engine, [{"role": "user", "content": "Hello"}], 4)
        workloads = []
        for name, conversations in speculative_workloads().items():
            before = copy.deepcopy(ours.spec_stats)
            ids, wall_s = ([], []), [0.0, 0.0]
            for messages in conversations:
                for i, engine in enumerate((plain, ours)):
                    out, seconds = await generate_ids(engine, messages, args.new_tokens)
                    ids[i].append(out)
                    wall_s[i] += seconds
            tokens = sum(len(out) for out in ids[1])
            plain_tok_s, spec_tok_s = sum(len(out) for out in ids[0]) / wall_s[0], tokens / wall_s[1]
            workloads.append(dict(workload=name, requests=len(conversations), tokens=tokens,
                                  plain_tok_s=plain_tok_s, speculative_tok_s=spec_tok_s,
                                  plain_wall_s=wall_s[0], speculative_wall_s=wall_s[1],
                                  speedup=ratio(spec_tok_s, plain_tok_s), identical=ids[0] == ids[1],
                                  **ours.spec_stats.since(before).as_dict()))
            _log(f"{name}: {plain_tok_s:.1f} tok/s without, {spec_tok_s:.1f} tok/s with")
        return dict(model=ours.model_name, dtype=config.dtype, new_tokens=args.new_tokens,
                    speculative=dataclasses.asdict(spec), engine_config=ours.status()["config"],
                    workloads=workloads)


def print_speculative_report(report: dict, file=None) -> None:
    spec = report["speculative"]
    cells = [("workload", "requests", "tokens", "plain tok/s", f"{spec['method']} tok/s", "speed-up",
              "tokens/verify step", "acceptance", "identical")]
    for w in report["workloads"]:
        cells.append((w["workload"], str(w["requests"]), str(w["tokens"]), format_value(w["plain_tok_s"]),
                      format_value(w["speculative_tok_s"]), format_value(w["speedup"], suffix="x"),
                      format_value(w["mean_tokens_per_verify_step"]),
                      format_value(100 * w["acceptance_rate"], ".1f", "%"),
                      "yes" if w["identical"] else "NO"))
    title = (f"kvloom speculative decoding, single stream: {report['model']} ({report['dtype']}, greedy, "
             f"up to {report['new_tokens']} new tokens a request)")
    note = (f"{spec['method']}: up to {spec['num_speculative_tokens']} drafts a step from n-grams of "
            f"{spec['prompt_lookup_max']} down to {spec['prompt_lookup_min']} tokens; tokens/verify step "
            "counts the model's own token after the accepted drafts")
    print_figures(title, format_table(cells), [note], file)


# ---- assembling ---------------------------------------------------------------------------------

def build_report(args, ours: dict, theirs: Optional[dict], matmul: dict) -> dict:
    throughput = []
    for c in args.concurrency:
        hf = theirs.get(c) if theirs else None
        throughput.append(dict(
            concurrency=c, num_requests=c, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            kvloom_tok_s=ours["throughput"][c]["tok_s"], kvloom_wall_s=ours["throughput"][c]["wall_s"],
            hf_tok_s=hf["tok_s"] if hf else None, hf_wall_s=hf["wall_s"] if hf else None,
            ratio=ratio(ours["throughput"][c]["tok_s"], hf["tok_s"] if hf else None),
            target=throughput_target(c)))
    top = max(args.concurrency)
    roof_tok_s = roofline_tokens_per_s(matmul["peak_gflops"] * 1e9, ours["num_parameters"])
    decode_tok_s = ours["throughput"][top]["tok_s"]
    return dict(
        model=ours["model"], dtype=args.dtype, num_parameters=ours["num_parameters"],
        settings=dict(concurrency=args.concurrency, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, long_prompt_tokens=args.long_prompt_tokens,
                      ttft_repeats=args.ttft_repeats,
                      seed=args.seed, hf=args.hf),
        engine_config=ours["engine_config"], parallel=ours["parallel"], engine_start_s=ours["start_s"],
        throughput=throughput, ttft=ours["ttft"], matmul=matmul,
        roofline=dict(tok_s=roof_tok_s, concurrency=top, decode_tok_s=decode_tok_s,
                      fraction=decode_tok_s / roof_tok_s, target=TARGETS["roofline_32"]),
        targets=TARGETS,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32],
                   help="comma-separated, e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--long-prompt-tokens", type=int, default=1500)
    p.add_argument("--ttft-repeats", type=int, default=3,
                   help="fresh prompts per TTFT length (median reported)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="measure HF transformers on the same prompts")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--compare-speculative", action="store_true",
                   help="instead: single-stream greedy tokens/s without and with speculative decoding on a "
                        "repeat-the-passage and a chat workload (--speculative, default ngram)")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the random prompts")
    p.add_argument("--matmul-sizes", type=parse_int_list, default=[2048, 3072])
    p.add_argument("--matmul-repeats", type=int, default=5)
    add_compile_cache_arg(p)
    add_engine_args(p, defaults_shown={"--max-running": "the highest concurrency; 1 with "
                                                        "--compare-speculative"})
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("new_tokens", "prompt_tokens", "long_prompt_tokens", "ttft_repeats", "matmul_repeats"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be positive")
    use_compile_cache(args.compile_cache)

    if args.compare_speculative:
        config = engine_config_from_args(args, max_running=1)
        report = asyncio.run(bench_speculative(config, args))
        return publish(report, print_speculative_report, args.json, "bench_engine")
    config = engine_config_from_args(args, max_running=max(args.concurrency))
    ours = asyncio.run(bench_kvloom(config, args))  # the engine is stopped on return
    _log(f"measuring the {args.dtype} matmul peak")
    matmul = measure_matmul_peak(args.matmul_sizes, args.matmul_repeats, args.dtype)
    theirs = bench_hf(ours["source"], ours["prompt_sets"], args.new_tokens) if args.hf else None
    report = build_report(args, ours, theirs, matmul)
    return publish(report, print_report, args.json, "bench_engine")


if __name__ == "__main__":
    report_config_errors("python -m kvloom.tools.bench_engine", main)
