"""Scoring figures for one model in float32 (or --dtype bfloat16; SCORING.md), kvloom beside HF
transformers (float32) in the same run: items/s per scoring mode, items/s as a fraction of the compute
roofline in that dtype, and request latency at a few item counts with concurrent clients.

    .venv/bin/python -m kvloom.tools.bench_score [--model PATH] [--dtype float32|bfloat16]
        [--query-tokens 2000] [--num-items 500] [--item-tokens 20] [--modes packed,batched]
        [--hf-sample 16] [--latency-items 10,100,500] [--clients 2] [--requests-per-point 4]
        [--hf/--no-hf] [--min-items-per-s N] [--json OUT.json]

The reference workload: one query of 2,000 random token ids, 500 items of 20, 2 label ids, all drawn
from a fixed seed and the same for every mode. Phases, each with a fixed number of requests:
  1. throughput: per mode, its own Engine (batched and packed compile their own score shapes; "single"
     runs on a packed engine). An untimed warm-up request of the same shape with fewer items and
     another query, then one timed request with all items: items/s = num_items / wall time (the
     query's prefill included, it is not in the prefix cache yet).
     HF transformers scores `--hf-sample` of the same items, each as its own `query ++ item` forward
     (`model(ids).logits[0, -1]`, no_grad, float32): items/s = sample / time. Its probabilities are
     compared with kvloom's for the same items.
  2. roofline: the best jitted `jnp.dot` GFLOP/s in the run's dtype (tools.machine);
     roofline items/s = peak / (2 * num_parameters * (query + num_items * item_tokens)) * num_items,
     i.e. every token of the request costs 2 FLOPs per parameter (embedding included, as in
     bench_engine), compared with each mode's items/s.
  3. latency: on the first mode's engine, a fresh query scored once alone (cold: the query is
     prefilled), then per item count `--clients` clients each send `--requests-per-point` requests
     back to back, all with that same query, so the radix prefix cache serves it; items are fresh
     random ids per request. p50/p99 over the point's requests (p99 of a few samples is near the max).
The spec's targets are printed beside the figures for context. The one gate: with --min-items-per-s N,
each mode's items/s is printed as PASS or FAIL against N, and the command exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Optional, Sequence

import numpy as np

from kvloom.tools.bench_engine import format_row, ready_engine
from kvloom.tools.machine import measure_matmul_peak, roofline_items_per_s
from kvloom.tools.peers import load_hf
from kvloom.tools.command_args import parse_int_list
from kvloom.tools.report import format_value, log, print_figures, publish, ratio
from kvloom.tools.workload import prompt_id_range, random_prompts
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, report_config_errors,
                                      use_compile_cache)

NUM_LABELS = 2

TARGETS = {
    "vs_hf": ">= 50x HF per-item forward",
    "roofline": ">= 60% of roofline",
}

HEADER = ("figure", "kvloom", "HF", "ratio", "target")


# ---- pure helpers -------------------------------------------------------------------------------

def parse_modes(text: str) -> list[str]:
    from kvloom.engine.scoring import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes from {', '.join(MODES)}, got {text!r}")
    return modes


def total_tokens(query_tokens: int, num_items: int, item_tokens: int) -> int:
    return query_tokens + num_items * item_tokens


def latency_summary(latencies_s: Sequence[float]) -> dict:
    values = np.asarray(latencies_s, dtype=float)
    return dict(p50_s=float(np.percentile(values, 50)), p99_s=float(np.percentile(values, 99)),
                mean_s=float(values.mean()), max_s=float(values.max()))


def max_relative_error(ours: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]]) -> float:
    a, b = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)  # [items, labels]
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def gate_verdict(throughput: Sequence[dict], min_items_per_s: Optional[float]) -> Optional[dict]:
    """Each mode's items/s against the gate; passed when every mode reaches it. None: no gate."""
    if min_items_per_s is None:
        return None
    modes = [dict(mode=t["mode"], items_per_s=t["kvloom_items_per_s"],
                  passed=t["kvloom_items_per_s"] >= min_items_per_s) for t in throughput]
    return dict(min_items_per_s=min_items_per_s, modes=modes, passed=all(m["passed"] for m in modes))


def gate_lines(gate: Optional[dict]) -> list[str]:
    if gate is None:
        return []
    return [f"gate {m['mode']}: {m['items_per_s']:.1f} items/s >= {gate['min_items_per_s']:g}: "
            f"{'PASS' if m['passed'] else 'FAIL'}" for m in gate["modes"]]


def exit_status(report: dict) -> int:
    """0, or 1 when the report's gate failed."""
    gate = report.get("gate")
    return 1 if gate is not None and not gate["passed"] else 0


def make_workload(rng: np.random.Generator, vocab_size: int, args) -> dict:
    """Every id the run sends, drawn once so that every mode scores the same request."""
    id_range = prompt_id_range(vocab_size)
    labels = rng.choice(np.arange(*id_range), size=NUM_LABELS, replace=False).tolist()
    return dict(
        id_range=id_range, label_token_ids=[int(t) for t in labels],
        query=random_prompts(rng, 1, args.query_tokens, id_range)[0],
        items=random_prompts(rng, args.num_items, args.item_tokens, id_range),
        warmup_query=random_prompts(rng, 1, args.query_tokens, id_range)[0],
        warmup_items=random_prompts(rng, args.warmup_items, args.item_tokens, id_range),
        latency_query=random_prompts(rng, 1, args.query_tokens, id_range)[0],
    )


# ---- the table ----------------------------------------------------------------------------------

def table_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    rows = [HEADER]
    for t in report["throughput"]:
        rows.append((f"items/s {t['mode']} ({t['num_items']} items)", format_value(t["kvloom_items_per_s"]),
                     format_value(t["hf_items_per_s"]), format_value(t["ratio"], suffix="x"), t["target"]))
    for m in report["roofline"]["modes"]:
        rows.append((f"% of roofline {m['mode']}", format_value(100 * m["fraction"], ".1f", "%"), "-", "",
                     report["roofline"]["target"]))
    lat = report["latency"]
    if lat is not None:
        cold = lat["cold"]
        rows.append((f"latency cold {cold['num_items']} items (ms)", format_value(cold["latency_s"] * 1e3),
                     "-", "", "query prefilled"))
        for p in lat["points"]:
            rows.append((f"latency {p['num_items']} items p50 (ms)", format_value(p["p50_s"] * 1e3), "-", "",
                         ""))
            rows.append((f"latency {p['num_items']} items p99 (ms)", format_value(p["p99_s"] * 1e3), "-", "",
                         f"{p['num_requests']} requests"))
    return rows


def report_lines(report: dict) -> list[str]:
    s, m, r = report["settings"], report["matmul"], report["roofline"]
    lat, hf = report["latency"], report["hf"]
    sizes = ",".join(str(n) for n in m["sizes"])
    lines = [
        f"{m['dtype']} matmul peak (jitted jnp.dot, n={sizes}, best of {m['repeats']}): "
        f"{m['peak_gflops']:.1f} GFLOP/s",
        f"roofline = peak / (2 x {report['num_parameters'] / 1e6:.1f}M params x {r['total_tokens']} tokens) "
        f"x {s['num_items']} items = {r['items_per_s']:.1f} items/s",
    ]
    if hf is not None:
        agreement = ", ".join(f"{mode} {err:.2e}" for mode, err in hf["max_rel_err"].items())
        lines.append(f"HF: {hf['num_items']} items, each its own {s['query_tokens'] + s['item_tokens']}"
                     f"-token forward, {hf['wall_s']:.2f} s; max relative error of kvloom's scores: "
                     f"{agreement}")
    if lat is not None:
        hits = ", ".join(f"{p['num_items']} items "
                         f"{p['prefix_cache_hit_tokens']}/{p['prefix_cache_query_tokens']}"
                         for p in lat["points"])
        lines.append(f"latency ({lat['mode']}, {lat['clients']} clients x {lat['requests_per_point']} "
                     f"requests back to back): every request shares one {s['query_tokens']}-token query, "
                     "which the radix prefix cache holds after the cold request; prefix cache hit/query "
                     f"tokens: {hits}")
    return lines + gate_lines(report.get("gate"))


def print_report(report: dict, file=None) -> None:
    s = report["settings"]
    print_figures(f"kvloom scoring benchmark: {report['model']} ({report['dtype']}, "
                  f"{report['num_parameters'] / 1e6:.1f}M params); query {s['query_tokens']} tokens, "
                  f"{s['num_items']} items x {s['item_tokens']} tokens, {len(s['label_token_ids'])} labels",
                  [format_row(row) for row in table_rows(report)], report_lines(report), file)


def _log(message: str) -> None:
    log("bench_score", message)


# ---- measurements -------------------------------------------------------------------------------

async def timed_score(engine, query, items, labels, mode: str) -> tuple[float, list[list[float]]]:
    t0 = time.perf_counter()
    out = await engine.score(query, items, labels, mode=mode)
    wall_s = time.perf_counter() - t0
    if len(out.scores) != len(items):
        raise RuntimeError(f"{mode}: {len(out.scores)} scores for {len(items)} items")
    return wall_s, out.scores


def _prefix_cache_counters(engine) -> tuple[int, int]:
    cache = engine.scheduler.prefix_cache
    return cache.num_hit_tokens, cache.num_query_tokens


async def measure_latency(engine, workload: dict, rng: np.random.Generator, mode: str, args) -> dict:
    """One cold request alone, then per item count `clients` clients sending requests back to back."""
    query, labels = workload["latency_query"], workload["label_token_ids"]

    def fresh_items(n: int) -> list[list[int]]:
        return random_prompts(rng, n, args.item_tokens, workload["id_range"])

    hits0, queries0 = _prefix_cache_counters(engine)
    cold_s, _ = await timed_score(engine, query, fresh_items(args.latency_items[0]), labels, mode)
    hits1, _ = _prefix_cache_counters(engine)
    cold = dict(num_items=args.latency_items[0], latency_s=cold_s, prefix_cache_hit_tokens=hits1 - hits0)
    _log(f"latency cold {cold['num_items']} items: {cold_s * 1e3:.1f} ms")

    points = []
    for n in args.latency_items:
        batches = [[fresh_items(n) for _ in range(args.requests_per_point)] for _ in range(args.clients)]

        async def client(requests: list[list[list[int]]]) -> list[float]:
            return [(await timed_score(engine, query, items, labels, mode))[0] for items in requests]

        hits0, queries0 = _prefix_cache_counters(engine)
        per_client = await asyncio.gather(*(client(b) for b in batches))
        latencies = [s for client_latencies in per_client for s in client_latencies]
        hits1, queries1 = _prefix_cache_counters(engine)
        points.append(dict(num_items=n, num_requests=len(latencies), latencies_s=latencies,
                           prefix_cache_hit_tokens=hits1 - hits0,
                           prefix_cache_query_tokens=queries1 - queries0,
                           **latency_summary(latencies)))
        _log(f"latency {n} items: p50 {points[-1]['p50_s'] * 1e3:.1f} ms, "
             f"p99 {points[-1]['p99_s'] * 1e3:.1f} ms")
    return dict(mode=mode, clients=args.clients, requests_per_point=args.requests_per_point,
                query_tokens=args.query_tokens, cold=cold, points=points)


def engine_config_for(args, mode: str):
    """The engine-size flags (tools.engine_args), plus a scoring config whose limits admit the workload."""
    from kvloom.engine.config import SchedulerConfig, ScoringConfig

    base = ScoringConfig()
    scoring = dict(mode=mode if mode != "single" else base.mode,
                   max_items=max(base.max_items, args.num_items, *args.latency_items),
                   max_total_tokens=max(base.max_total_tokens, total_tokens(
                       args.query_tokens, max(args.num_items, *args.latency_items), args.item_tokens)))
    if args.tokens_per_step is not None:
        scoring["tokens_per_step"] = args.tokens_per_step
        scoring["max_item_tokens"] = min(base.max_item_tokens, args.tokens_per_step)
    if args.max_items_per_step is not None:
        scoring["max_items_per_step"] = args.max_items_per_step
    # max_running: the engine's default unless the clients need more (single mode makes each item a request)
    config = engine_config_from_args(args, max_running=max(args.clients, SchedulerConfig().max_running))
    return config.replace(scoring=ScoringConfig(**scoring))


async def bench_mode(config, mode: str, args, workload: Optional[dict], measure_latency_here: bool) -> dict:
    """Start an engine for `mode`; warm-up request, the timed request, and the latency phase if asked."""
    import dataclasses

    _log(f"{mode}: starting the engine (compiles every step shape)")
    async with ready_engine(config) as (engine, start_s):
        rng = np.random.default_rng(args.seed)
        workload = workload or make_workload(rng, engine.runner.vocab_size, args)
        labels = workload["label_token_ids"]
        _log(f"{mode}: warm-up request of {args.warmup_items} items")
        await timed_score(engine, workload["warmup_query"], workload["warmup_items"], labels, mode)
        wall_s, scores = await timed_score(engine, workload["query"], workload["items"], labels, mode)
        _log(f"{mode}: {args.num_items} items in {wall_s:.2f} s = {args.num_items / wall_s:.1f} items/s")
        latency = None
        if measure_latency_here:
            latency = await measure_latency(engine, workload, np.random.default_rng(args.seed + 1), mode,
                                            args)
        status = engine.status()
        engine_config = dict(status["config"], scoring=dataclasses.asdict(engine.config.scoring))
        return dict(model=engine.model_name, source=engine.runner.source,
                    num_parameters=engine.runner.model_config.num_parameters, engine_config=engine_config,
                    parallel=status["parallel"], start_s=start_s, workload=workload, wall_s=wall_s,
                    scores=scores, latency=latency)


def bench_hf(source, workload: dict, num_items: int) -> dict:
    """The first `num_items` items, each scored as its own `query ++ item` forward, after one untimed
    forward."""
    import torch

    _log("loading the model in transformers")
    model = load_hf(source)
    query, labels = workload["query"], workload["label_token_ids"]
    sample = workload["items"][:num_items]

    def forward(item: list[int]) -> list[float]:
        ids = torch.tensor([query + item], dtype=torch.long)  # ids: [1, query + item]
        logits = model(ids).logits[0, -1]  # logits: [vocab]
        return torch.softmax(logits.float(), dim=-1)[labels].tolist()

    with torch.no_grad():
        forward(sample[0])  # warm-up
        t0 = time.perf_counter()
        scores = [forward(item) for item in sample]
        wall_s = time.perf_counter() - t0
    _log(f"transformers: {len(sample)} items in {wall_s:.2f} s = {len(sample) / wall_s:.2f} items/s")
    return dict(num_items=len(sample), wall_s=wall_s, items_per_s=len(sample) / wall_s, scores=scores)


# ---- assembling ---------------------------------------------------------------------------------

def build_report(args, runs: dict[str, dict], theirs: Optional[dict], matmul: dict) -> dict:
    first = runs[args.modes[0]]
    hf_items_per_s = theirs["items_per_s"] if theirs else None
    throughput = []
    for mode, run in runs.items():
        items_per_s = args.num_items / run["wall_s"]
        throughput.append(dict(mode=mode, num_items=args.num_items, total_tokens=total_tokens(
            args.query_tokens, args.num_items, args.item_tokens), kvloom_wall_s=run["wall_s"],
            kvloom_items_per_s=items_per_s, engine_start_s=run["start_s"], hf_items_per_s=hf_items_per_s,
            ratio=ratio(items_per_s, hf_items_per_s), target=TARGETS["vs_hf"]))
    roof = roofline_items_per_s(matmul["peak_gflops"] * 1e9, first["num_parameters"], args.query_tokens,
                                args.num_items, args.item_tokens)
    hf = None
    if theirs:
        n = theirs["num_items"]
        hf = dict(num_items=n, wall_s=theirs["wall_s"], items_per_s=theirs["items_per_s"],
                  max_rel_err={mode: max_relative_error(run["scores"][:n], theirs["scores"])
                               for mode, run in runs.items()})
    return dict(
        model=first["model"], dtype=args.dtype, num_parameters=first["num_parameters"],
        settings=dict(query_tokens=args.query_tokens, num_items=args.num_items, item_tokens=args.item_tokens,
                      label_token_ids=first["workload"]["label_token_ids"], modes=args.modes,
                      warmup_items=args.warmup_items, hf=args.hf, hf_sample=args.hf_sample,
                      latency_items=args.latency_items, clients=args.clients,
                      requests_per_point=args.requests_per_point, seed=args.seed),
        engine_config={mode: run["engine_config"] for mode, run in runs.items()},
        throughput=throughput, hf=hf, matmul=matmul,
        roofline=dict(items_per_s=roof, total_tokens=total_tokens(args.query_tokens, args.num_items,
                                                                  args.item_tokens),
                      modes=[dict(mode=t["mode"], kvloom_items_per_s=t["kvloom_items_per_s"],
                                  fraction=t["kvloom_items_per_s"] / roof) for t in throughput],
                      target=TARGETS["roofline"]),
        latency=first["latency"], targets=TARGETS, parallel=first["parallel"],
        gate=gate_verdict(throughput, args.min_items_per_s),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--query-tokens", type=int, default=2000)
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--item-tokens", type=int, default=20)
    p.add_argument("--modes", type=parse_modes, default=["packed", "batched"],
                   help="comma-separated from single,batched,packed; the first also runs the latency phase")
    p.add_argument("--warmup-items", type=int, default=None, help="items of the warm-up request "
                   "(default: a tenth of --num-items)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="measure HF transformers on a sample of the same items")
    p.add_argument("--hf-sample", type=int, default=16, help="items HF scores, each as its own forward")
    p.add_argument("--latency-items", type=parse_int_list, default=[10, 100, 500], help="e.g. 10,100,500")
    p.add_argument("--clients", type=int, default=2, help="concurrent clients of the latency phase")
    p.add_argument("--requests-per-point", type=int, default=4,
                   help="requests each client sends per item count")
    p.add_argument("--min-items-per-s", type=float, default=None,
                   help="the gate: PASS when every mode scores at least this many items/s, else FAIL "
                        "and exit status 1 (default: no gate)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the random ids")
    p.add_argument("--matmul-sizes", type=parse_int_list, default=[2048, 3072])
    p.add_argument("--matmul-repeats", type=int, default=5)
    add_compile_cache_arg(p)
    add_engine_args(p, defaults_shown={"--max-running": "the engine's, or --clients when more"})
    scoring = p.add_argument_group("scoring (default: the engine's own defaults)")
    scoring.add_argument("--tokens-per-step", type=int, default=None, help="item tokens in one score step")
    scoring.add_argument("--max-items-per-step", type=int, default=None)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.warmup_items is None:
        args.warmup_items = max(1, args.num_items // 10)
    for name in ("query_tokens", "num_items", "item_tokens", "warmup_items", "hf_sample", "clients",
                 "requests_per_point", "matmul_repeats"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be positive")
    args.warmup_items = min(args.warmup_items, args.num_items)
    args.hf_sample = min(args.hf_sample, args.num_items)
    use_compile_cache(args.compile_cache)

    runs, workload = {}, None
    for i, mode in enumerate(args.modes):  # one engine at a time, each stopped on return
        runs[mode] = asyncio.run(bench_mode(engine_config_for(args, mode), mode, args, workload, i == 0))
        workload = runs[mode]["workload"]
    _log(f"measuring the {args.dtype} matmul peak")
    matmul = measure_matmul_peak(args.matmul_sizes, args.matmul_repeats, args.dtype)
    theirs = bench_hf(runs[args.modes[0]]["source"], workload, args.hf_sample) if args.hf else None
    report = build_report(args, runs, theirs, matmul)
    return publish(report, print_report, args.json, "bench_score")


if __name__ == "__main__":
    raise SystemExit(exit_status(report_config_errors("python -m kvloom.tools.bench_score", main)))
