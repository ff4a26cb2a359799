"""`kvloom soak`: a long mixed workload at a fixed concurrency, to catch what only time shows (leaks,
slow drift, rare errors).

Data flow:
  args -> SoakPlan (validated once; UsageError -> exit 2)
  mixed_specs: an endless request stream; a --score-fraction of /v1/score requests spread evenly,
      the rest chat completions alternating streaming and non-streaming (tools.workload makes the
      bodies)
  tools.load.run_phase: C closed-loop workers (--concurrency) until --duration passed or
      --max-requests were sent; --time-limit is the hard wall-clock cap (requests in flight then are
      cancelled and counted as "time_limit" errors); a progress line on stderr every
      --progress-interval seconds
  tools.http_client.send_request: one request of any kind, its outcome in a RequestRecord
  tools.slo.build_summary, overall and per kind -> the stdout report and --json

Kinds: "chat_stream", "chat" (non-streaming) and "score". Exit code: 0 when the error rate is at most
--max-error-rate (default 0: any error fails the soak), 1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import aiohttp
import numpy as np

from kvloom.tools.command_args import UsageError, options_json, parse_label_ids, require
from kvloom.tools.http_client import base_url, discover_model, send_request
from kvloom.tools.load import LoadPoint, run_phase
from kvloom.tools.report import format_ms, write_json
from kvloom.tools.slo import RequestRecord, build_summary
from kvloom.tools.workload import (LengthDist, RequestSpec, SharedPrefix, Workload, non_streaming,
                                   prompt_id_range,
                                   request_specs)

KINDS = ("chat_stream", "chat", "score")


# ---- workload -----------------------------------------------------------------------------------

def kind_of(spec: RequestSpec) -> str:
    if spec.path == "/v1/score":
        return "score"
    return "chat_stream" if spec.is_stream else "chat"


def mixed_specs(chat: Workload, score: Workload, score_fraction: float,
                rng: np.random.Generator) -> Iterator[RequestSpec]:
    """Request i is a score when floor((i + 1) f) > floor(i f): the scores spread evenly at fraction f;
    the chat requests alternate streaming and non-streaming, streaming first."""
    chats = request_specs(chat, rng, SharedPrefix(0, chat.id_range))
    scores = request_specs(score, rng, SharedPrefix(1, score.id_range))
    num_chat = 0
    for i in itertools.count():
        if int((i + 1) * score_fraction) > int(i * score_fraction):
            yield next(scores)
        else:
            spec = next(chats)
            yield spec if num_chat % 2 == 0 else non_streaming(spec)
            num_chat += 1


@dataclass(frozen=True)
class SoakPlan:
    base_url: str
    chat: Workload
    score: Workload
    score_fraction: float
    concurrency: int
    duration_s: float
    max_requests: Optional[int]
    timeout_s: float
    time_limit_s: float
    progress_interval_s: float
    max_error_rate: float
    json_path: Optional[str]
    seed: int
    config: dict  # the options as given, for the JSON report


def plan_from_args(args) -> SoakPlan:
    """Validate the options as a whole; UsageError names the option at fault."""
    require(args.duration > 0, "--duration must be > 0")
    require(args.concurrency >= 1, "--concurrency must be >= 1")
    require(0.0 <= args.score_fraction <= 1.0, "--score-fraction must be in [0, 1]")
    require(args.max_requests is None or args.max_requests >= 1, "--max-requests must be >= 1")
    require(min(args.max_tokens, args.input_len, args.query_tokens, args.num_items, args.item_tokens) >= 1,
           "--max-tokens, --input-len, --query-tokens, --num-items and --item-tokens must be >= 1")
    require(args.timeout > 0, "--timeout must be > 0")
    require(args.time_limit is None or args.time_limit > 0, "--time-limit must be > 0")
    require(args.progress_interval > 0, "--progress-interval must be > 0")
    require(0.0 <= args.max_error_rate <= 1.0, "--max-error-rate must be in [0, 1]")
    require(args.vocab_size is None or args.vocab_size > 4, "--vocab-size must be > 4")
    label_ids = parse_label_ids(args.label_token_ids)
    require(args.vocab_size is None or all(0 <= t < args.vocab_size for t in label_ids),
           "--label-token-ids must lie in [0, --vocab-size)")
    fixed_output = LengthDist("fixed", args.max_tokens)
    chat = Workload(kind="generate", api="chat", prompt_format="text",
                    input_len=LengthDist("fixed", args.input_len), output_len=fixed_output,
                    model=args.model)
    score = Workload(kind="score", api="completions", prompt_format="ids",
                     input_len=LengthDist("fixed", args.query_tokens),
                     output_len=fixed_output, id_range=prompt_id_range(args.vocab_size),
                     model=args.model, query_tokens=args.query_tokens, num_items=args.num_items,
                     item_tokens=args.item_tokens, label_token_ids=label_ids)
    return SoakPlan(base_url=base_url(args.url), chat=chat, score=score,
                    score_fraction=args.score_fraction, concurrency=args.concurrency,
                    duration_s=args.duration, max_requests=args.max_requests, timeout_s=args.timeout,
                    time_limit_s=args.time_limit or args.duration + args.timeout,
                    progress_interval_s=args.progress_interval, max_error_rate=args.max_error_rate,
                    json_path=args.json, seed=args.seed, config=options_json(args))


# ---- run ----------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the progress line reads while the soak runs."""

    start: float
    num_done: int = 0
    num_errors: int = 0
    by_kind: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def line(self, plan: SoakPlan, in_flight: int) -> str:
        elapsed = time.perf_counter() - self.start
        kinds = " ".join(f"{k} {n}" for k, n in self.by_kind.items())
        rate = 100 * self.num_errors / self.num_done if self.num_done else 0.0
        return (f"kvloom soak: {elapsed:6.0f}/{plan.duration_s:.0f} s  {self.num_done} done ({kinds}), "
                f"{in_flight} in flight, {self.num_errors} errors ({rate:.2f}%), "
                f"{self.num_done / elapsed if elapsed > 0 else 0.0:.2f} req/s")


def summarize(tagged: list[tuple[str, RequestRecord]], duration_s: float) -> dict:
    """tools.slo.build_summary over all requests, and per kind (SLO fields left out)."""
    def figures(records):
        summary = build_summary(records, duration_s)
        summary.pop("slos")
        summary.pop("passed")
        return summary

    report = figures([rec for _, rec in tagged])
    report["by_kind"] = {kind: figures([rec for k, rec in tagged if k == kind]) for kind in KINDS}
    return report


def format_report(report: dict, plan: SoakPlan) -> str:
    r = report
    counts = ", ".join(f"{k} {r['by_kind'][k]['num_requests']}" for k in KINDS)
    lines = [f"\nkvloom soak: {r['duration_s']:.1f} s against {plan.base_url}, concurrency {plan.concurrency}"
             + ("  [stopped by --time-limit]" if r["stopped_by_time_limit"] else ""),
             f"  requests   {r['num_requests']} ({counts}), {r['num_errors']} errors "
             f"({100 * r['error_rate']:.2f}%), {r['request_throughput']:.2f} req/s completed"]
    for name, count in r["errors"].items():
        lines.append(f"    {name:<38} {count}")
    lines.append(f"  {'latency (ms)':<20}{'n':>8}{'p50':>10}{'p90':>10}{'p99':>10}")
    for kind, metric in (("chat_stream", "ttft"), ("chat_stream", "e2e"), ("chat", "e2e"), ("score", "e2e")):
        m = r["by_kind"][kind][f"{metric}_ms"]
        lines.append(f"  {kind + ' ' + metric:<20}{m['count']:>8}"
                     + "".join(f"{format_ms(m[k]):>10}" for k in ("p50", "p90", "p99")))
    lines.append(f"kvloom soak: {'PASS' if r['passed'] else 'FAIL'} "
                 f"(error rate {100 * r['error_rate']:.2f}%, "
                 f"at most {100 * plan.max_error_rate:.2f}% allowed)")
    return "\n".join(lines)


async def run_soak(args) -> int:
    """The async entry point: run, print, write --json; the exit code."""
    try:
        plan = plan_from_args(args)
    except UsageError as exc:
        print(f"kvloom soak: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(plan.seed)
    tagged: list[tuple[str, RequestRecord]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        chat, score = plan.chat, plan.score
        if chat.model is None:
            model = await discover_model(session, plan.base_url, min(plan.timeout_s, 10.0))
            chat, score = dataclasses.replace(chat, model=model), dataclasses.replace(score, model=model)
        tally = Tally(time.perf_counter())

        async def send(spec: RequestSpec, rec: RequestRecord) -> None:
            kind = kind_of(spec)
            tagged.append((kind, rec))
            try:
                await send_request(session, plan.base_url, spec, rec, plan.timeout_s)
            finally:
                tally.num_done += 1
                tally.num_errors += rec.error is not None or rec.e2e is None
                tally.by_kind[kind] += 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(plan.progress_interval_s)
                print(tally.line(plan, len(tagged) - tally.num_done), file=sys.stderr, flush=True)

        reporter = asyncio.ensure_future(progress())
        try:
            phase = await run_phase(send, mixed_specs(chat, score, plan.score_fraction, rng),
                                          LoadPoint(plan.concurrency), num_requests=plan.max_requests,
                                          duration_s=plan.duration_s, time_limit_s=plan.time_limit_s, rng=rng)
        finally:
            reporter.cancel()
        print(tally.line(plan, 0), file=sys.stderr, flush=True)
    report = summarize(tagged, phase.duration_s)
    report["stopped_by_time_limit"] = phase.is_time_limited
    report["passed"] = report["error_rate"] <= plan.max_error_rate and report["num_requests"] > 0
    report["config"] = dict(plan.config, model=chat.model, time_limit=plan.time_limit_s)
    print(format_report(report, plan), flush=True)
    write_json(plan.json_path, report)
    return 0 if report["passed"] else 1


def main_from_args(args) -> int:
    return asyncio.run(run_soak(args))
