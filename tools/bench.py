"""`kvloom bench`: a serving load generator for any OpenAI-compatible server.

Data flow, per load point (one, or one per sweep value):
  args -> BenchPlan (validated once; UsageError -> exit 2)
  tools.workload: Workload + seeded RNG -> an endless stream of RequestSpecs (synthetic id or text
      prompts with a shared prefix, prompts from a JSONL file, or /v1/score bodies)
  tools.load.run_phase: the warm-up requests, then the measured ones, sent by C closed-loop workers
      (--concurrency) or on a Poisson/constant arrival clock (--request-rate, optionally capped by
      --concurrency); tools.http_client.send_request times each into a RequestRecord
  tools.slo.build_summary(records) -> the summary dict (counts, errors, throughput, latency
      percentiles, SLO verdicts) -> the stdout table, --json, --plot (tools.plot)

Every run is bounded: --num-requests and/or --duration bound what is sent, --timeout each request,
and --time-limit each phase on the wall clock (requests still in flight then are cancelled and
counted as "time_limit" errors). Exit code: 0 when every SLO passes (or none is given), 1 when any
fails, 2 for usage errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import aiohttp
import numpy as np

from kvloom.tools.command_args import (DEFAULT_NUM_REQUESTS, UsageError, number_list, options_json,
                                       parse_label_ids, require)
from kvloom.tools.http_client import base_url, discover_model, send_request
from kvloom.tools.load import LoadPoint, Phase, run_phase
from kvloom.tools.report import format_ms, write_json
from kvloom.tools.slo import SLO, build_summary, parse_slos
from kvloom.tools.workload import (SharedPrefix, Workload, load_prompts_file, parse_length_dist,
                                   prompt_id_range,
                                   request_specs)

DEFAULT_TIME_LIMIT_S = 600.0


# ---- plan ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchPlan:
    base_url: str
    workload: Workload
    points: tuple[LoadPoint, ...]
    sweep: Optional[str]  # "concurrency", "request_rate" or None
    num_requests: Optional[int]
    duration_s: Optional[float]
    warmup_requests: int
    timeout_s: float
    time_limit_s: float
    slos: tuple[SLO, ...]
    json_path: Optional[str]
    plot_path: Optional[str]
    seed: int
    show_progress: bool
    config: dict  # the options as given, for the JSON report


def _workload_from_args(args) -> Workload:
    kind = args.workload
    prompt_format = args.prompt_format or ("text" if args.api == "chat" and kind == "generate" else "ids")
    require(not (args.api == "chat" and prompt_format == "ids" and kind == "generate"),
             "--prompt-format ids needs --api completions (chat messages are text)")
    require(0.0 <= args.shared_prefix_ratio <= 1.0, "--shared-prefix-ratio must be in [0, 1]")
    require(args.vocab_size is None or args.vocab_size > 4, "--vocab-size must be > 4")
    try:
        input_len = parse_length_dist(args.input_len_dist, args.input_len)
        output_len = parse_length_dist(args.output_len_dist, args.output_len)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--extra-body: not JSON: {exc}") from None
    require(isinstance(extra_body, dict), "--extra-body must be a JSON object")
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    label_ids = ()
    if kind == "score":
        require(args.prompts_file is None, "--prompts-file does not apply to --workload score")
        require(args.label_token_ids is not None, "--workload score needs --label-token-ids, e.g. 1,2")
        label_ids = parse_label_ids(args.label_token_ids)
        require(min(args.query_tokens, args.num_items, args.item_tokens) >= 1,
                 "--query-tokens, --num-items and --item-tokens must be >= 1")
    prompts = load_prompts_file(args.prompts_file, args.api) if args.prompts_file else ()
    return Workload(kind=kind, api=args.api, prompt_format=prompt_format, input_len=input_len,
                    output_len=output_len, shared_prefix_ratio=args.shared_prefix_ratio,
                    id_range=prompt_id_range(args.vocab_size), prompts=prompts, extra_body=extra_body,
                    model=args.model, query_tokens=args.query_tokens, num_items=args.num_items,
                    item_tokens=args.item_tokens, label_token_ids=label_ids)


def _points_from_args(args) -> tuple[tuple[LoadPoint, ...], Optional[str]]:
    require(not (args.sweep_concurrency and args.sweep_rate),
             "give --sweep-concurrency or --sweep-rate, not both")
    require(args.concurrency is None or args.concurrency >= 1, "--concurrency must be >= 1")
    require(args.request_rate is None or args.request_rate > 0, "--request-rate must be > 0")
    if args.sweep_concurrency:
        values = number_list(args.sweep_concurrency, int, "--sweep-concurrency")
        return tuple(LoadPoint(c, args.request_rate, args.arrival) for c in values), "concurrency"
    if args.sweep_rate:
        values = number_list(args.sweep_rate, float, "--sweep-rate")
        return tuple(LoadPoint(args.concurrency, r, args.arrival) for r in values), "request_rate"
    concurrency = args.concurrency if args.concurrency or args.request_rate else 1
    return (LoadPoint(concurrency, args.request_rate, args.arrival),), None


def default_time_limit(num_requests: Optional[int], duration_s: Optional[float], rates: Sequence[float],
                       timeout_s: float) -> float:
    """Per phase: the sending window plus one request timeout, and at least 600 s without --duration."""
    if duration_s:
        return duration_s + timeout_s
    slowest = min(rates, default=None)
    sending = num_requests / slowest if slowest and num_requests else 0.0
    return max(DEFAULT_TIME_LIMIT_S, sending + timeout_s)


def plan_from_args(args) -> BenchPlan:
    """Validate the options as a whole; UsageError names the option at fault."""
    workload = _workload_from_args(args)
    points, sweep = _points_from_args(args)
    require(args.num_requests is None or args.num_requests >= 1, "--num-requests must be >= 1")
    require(args.duration is None or args.duration > 0, "--duration must be > 0")
    require(args.warmup_requests >= 0, "--warmup-requests must be >= 0")
    require(args.timeout > 0, "--timeout must be > 0")
    require(args.time_limit is None or args.time_limit > 0, "--time-limit must be > 0")
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    try:
        slos = tuple(parse_slos(args.slo)) if args.slo else ()
    except ValueError as exc:
        raise UsageError(f"--slo: {exc}") from None
    if workload.kind == "score":
        per_token = [s.name for s in slos if s.metric in ("ttft", "itl", "tpot")]
        require(not per_token, f"--slo: {', '.join(per_token)} has no meaning for --workload score "
                                "(use e2e_* and error_rate)")
    if args.plot:
        require(importlib.util.find_spec("matplotlib") is not None,
                 "--plot needs matplotlib: pip install 'kvloom[bench]'")
    time_limit = args.time_limit or default_time_limit(
        num_requests, args.duration, [p.request_rate for p in points if p.request_rate], args.timeout)
    return BenchPlan(base_url=base_url(args.url), workload=workload, points=points, sweep=sweep,
                     num_requests=num_requests, duration_s=args.duration,
                     warmup_requests=args.warmup_requests,
                     timeout_s=args.timeout, time_limit_s=time_limit, slos=slos, json_path=args.json,
                     plot_path=args.plot, seed=args.seed, show_progress=not args.no_progress,
                     config=options_json(args))


# ---- run ----------------------------------------------------------------------------------------

class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _progress(total: Optional[int], desc: str, show: bool):
    """A tqdm bar on stderr; nothing when hidden or tqdm is not installed (it comes with kvloom[bench])."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not show, leave=False,
                dynamic_ncols=True)


async def run_point(session: aiohttp.ClientSession, plan: BenchPlan, workload: Workload, point: LoadPoint,
                    index: int) -> dict:
    """Warm-up, then the measured phase, at one load point: its summary. Each point draws its own
    prompts (seed, index); the shared prefix is the same at every point."""
    rng = np.random.default_rng([plan.seed, index])
    specs = request_specs(workload, rng, SharedPrefix(plan.seed, workload.id_range))

    async def send(spec, rec):
        await send_request(session, plan.base_url, spec, rec, plan.timeout_s)

    warmup = Phase([], 0.0, False)
    if plan.warmup_requests:
        with _progress(plan.warmup_requests, f"{point.label} warm-up", plan.show_progress) as bar:
            warmup = await run_phase(send, specs, LoadPoint(point.concurrency or 1),
                                     num_requests=plan.warmup_requests, duration_s=None,
                                     time_limit_s=plan.time_limit_s, rng=rng, on_done=lambda: bar.update(1))
    with _progress(plan.num_requests, point.label, plan.show_progress) as bar:
        phase = await run_phase(send, specs, point, num_requests=plan.num_requests,
                                duration_s=plan.duration_s,
                                time_limit_s=plan.time_limit_s, rng=rng, on_done=lambda: bar.update(1))
    summary = {"load": point.to_json(), "label": point.label}
    summary.update(build_summary(phase.records, phase.duration_s, plan.slos))
    summary["stopped_by_time_limit"] = phase.is_time_limited
    summary["warmup"] = {"num_requests": len(warmup.records),
                         "num_errors": sum(not r.is_ok for r in warmup.records)}
    return summary


def format_summary(summary: dict, workload: Workload, plan: BenchPlan) -> str:
    s = summary
    if workload.kind == "score":
        source = "score"
    elif workload.prompts:
        source = f"{workload.api}, {len(workload.prompts)} file prompts"
    else:
        source = f"{workload.api}, {workload.prompt_format} prompts of {workload.input_len.describe()} tokens"
    lines = [f"\nkvloom bench {s['label']}: {source} -> {plan.base_url}  "
             f"(warm-up {s['warmup']['num_requests']}, {s['warmup']['num_errors']} errors)",
             f"  requests   {s['completed']} completed of {s['num_requests']} sent, {s['num_errors']} errors "
             f"({100 * s['error_rate']:.1f}%) in {s['duration_s']:.2f} s"
             + ("  [stopped by --time-limit]" if s["stopped_by_time_limit"] else "")]
    for name, count in s["errors"].items():
        lines.append(f"    {name:<34} {count}")
    lines.append(f"  throughput {s['request_throughput']:.2f} req/s, "
                 + (f"{s['items_per_s']:.1f} items/s ({s['items']} items)" if workload.kind == "score" else
                    f"{s['output_throughput']:.1f} output tok/s ({s['input_tokens']} in, "
                    f"{s['output_tokens']} out tokens)"))
    lines.append(f"  {'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'n':>8}")
    metrics = ("e2e",) if workload.kind == "score" else ("ttft", "tpot", "itl", "e2e")
    for metric in metrics:
        m = s[f"{metric}_ms"]
        lines.append(f"  {metric:<14}" + "".join(f"{format_ms(m[k]):>10}" for k in ("mean", "p50", "p90",
                                                                                    "p99"))
                     + f"{m['count']:>8}")
    if s["slos"]:
        lines.append(f"  {'SLO':<14}{'threshold':>12}{'measured':>12}{'result':>8}{'violations':>12}")
        for r in s["slos"]:
            measured = "-" if r["measured"] is None else (
                f"{r['measured']:.1f}ms" if r["unit"] == "ms" else f"{100 * r['measured']:.2f}%")
            violations = "-" if r["violation_rate"] is None else f"{100 * r['violation_rate']:.1f}%"
            lines.append(f"  {r['name']:<14}{r['threshold']:>12}{measured:>12}"
                         f"{'PASS' if r['passed'] else 'FAIL':>8}{violations:>12}")
    return "\n".join(lines)


def format_sweep(runs: Sequence[dict], workload: Workload) -> str:
    is_score = workload.kind == "score"
    throughput = ("items/s", "items_per_s") if is_score else ("out tok/s", "output_throughput")
    header = (f"{'point':<16}{'req/s':>8}{throughput[0]:>11}{'ttft p50':>10}{'ttft p99':>10}"
              f"{'e2e p50':>10}{'e2e p99':>10}{'errors':>8}  SLOs")
    lines = ["\nsweep (latencies in ms)", header]
    for s in runs:
        lines.append(f"{s['label']:<16}{s['request_throughput']:>8.2f}{s[throughput[1]]:>11.1f}"
                     f"{format_ms(s['ttft_ms']['p50']):>10}{format_ms(s['ttft_ms']['p99']):>10}"
                     f"{format_ms(s['e2e_ms']['p50']):>10}{format_ms(s['e2e_ms']['p99']):>10}"
                     f"{s['num_errors']:>8}  "
                     + ("-" if not s["slos"] else "pass" if s["passed"] else "FAIL"))
    return "\n".join(lines)


async def run_bench(args) -> int:
    """The async entry point: run every load point, print, write --json and --plot; the exit code."""
    try:
        plan = plan_from_args(args)
    except UsageError as exc:
        print(f"kvloom bench: error: {exc}", file=sys.stderr)
        return 2
    runs = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        workload = plan.workload
        if workload.model is None:
            workload = dataclasses.replace(workload, model=await discover_model(session, plan.base_url,
                                                                                min(plan.timeout_s, 10.0)))
        for index, point in enumerate(plan.points):
            summary = await run_point(session, plan, workload, point, index)
            print(format_summary(summary, workload, plan), flush=True)
            runs.append(summary)
    if plan.sweep:
        print(format_sweep(runs, workload))
    passed = all(s["passed"] for s in runs)
    config = dict(plan.config, model=workload.model, time_limit=plan.time_limit_s,
                  num_requests=plan.num_requests)
    report = (dict(runs[0], config=config) if plan.sweep is None else
              {"config": config, "sweep": {"parameter": plan.sweep, "values": [
                  p.concurrency if plan.sweep == "concurrency" else p.request_rate for p in plan.points]},
               "runs": runs, "passed": passed})
    write_json(plan.json_path, report)
    if plan.plot_path:
        from kvloom.tools.plot import plot_sweep

        plot_sweep(plan.plot_path, runs, [s["label"] for s in runs], workload=workload.kind, slos=plan.slos)
        print(f"kvloom bench: plot written to {plan.plot_path}")
    if plan.slos:
        print(f"kvloom bench: SLOs {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


def main_from_args(args) -> int:
    return asyncio.run(run_bench(args))
