"""`kvloom soak`: a long mixed workload at a fixed concurrency, to catch what only time shows (leaks,
slow drift, rare errors).

Data flow:
  args -> SoakPlan (validated once; bench.UsageError -> exit 2)
  mixed_specs: an endless request stream; a --score-fraction of /v1/score requests spread evenly,
      the rest chat completions alternating streaming and non-streaming (tools.bench.request_specs
      makes the bodies)
  tools.bench.run_phase: C closed-loop workers (--concurrency) until --duration passed or
      --max-requests were sent; --time-limit is the hard wall-clock cap (requests in flight then are
      cancelled and counted as "time_limit" errors); a progress line on stderr every
      --progress-interval seconds
  send_any: streams and scores through tools.bench.send_request; non-streaming chat here
  tools.slo.build_summary, overall and per kind -> the stdout report and --json

Kinds: "chat_stream", "chat" (non-streaming) and "score". Exit code: 0 when the error rate is at most
--max-error-rate (default 0: any error fails the soak), 1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, Optional

import aiohttp
import numpy as np
import orjson

from kvloom.tools import bench
from kvloom.tools.bench import LoadPoint, RequestSpec, SharedPrefix, UsageError, Workload
from kvloom.tools.slo import RequestRecord, build_summary

KINDS = ("chat_stream", "chat", "score")


# ---- one request --------------------------------------------------------------------------------

async def post_json(session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, rec: RequestRecord,
                    timeout_s: float, read_ok: Callable[[aiohttp.ClientResponse, RequestRecord, float],
                                                        Awaitable[None]]) -> None:
    """POST spec.body and hand a 2xx response to read_ok(resp, rec, start). HTTP errors and failures
    become rec.error with tools.bench's error types (bench.send_request reads only streams and scores,
    so its classification is mirrored here for the readers it lacks)."""
    start = time.perf_counter()
    try:
        async with session.post(base_url + spec.path, data=orjson.dumps(spec.body),
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status >= 400:
                rec.error = await bench._http_error(resp)
            else:
                await read_ok(resp, rec, start)
    except asyncio.TimeoutError:
        rec.error = "timeout"
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        rec.error = "connection_error"
    except aiohttp.ClientError:
        rec.error = "client_error"
    except (ValueError, TypeError, AttributeError):
        rec.error = "bad_response"


async def read_chat_response(resp: aiohttp.ClientResponse, rec: RequestRecord, start: float) -> None:
    """A non-streaming chat (or text) completion: e2e and the server's token counts."""
    body = await resp.json(content_type=None)
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        rec.error = "bad_response"
        return
    rec.e2e = time.perf_counter() - start
    usage = body.get("usage")
    if isinstance(usage, dict):
        rec.output_tokens = usage.get("completion_tokens") or 0
        rec.prompt_tokens = usage.get("prompt_tokens")


async def send_any(session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, rec: RequestRecord,
                   timeout_s: float) -> None:
    """One request of any kind; failures become rec.error, never exceptions (but cancellation)."""
    if spec.is_stream or spec.path == "/v1/score":
        await bench.send_request(session, base_url, spec, rec, timeout_s)
    else:
        await post_json(session, base_url, spec, rec, timeout_s, read_chat_response)


def kind_of(spec: RequestSpec) -> str:
    if spec.path == "/v1/score":
        return "score"
    return "chat_stream" if spec.is_stream else "chat"


def non_streaming(spec: RequestSpec) -> RequestSpec:
    body = {k: v for k, v in spec.body.items() if k not in ("stream", "stream_options")}
    return RequestSpec(spec.path, dict(body, stream=False), is_stream=False)


# ---- workload -----------------------------------------------------------------------------------

def mixed_specs(chat: Workload, score: Workload, score_fraction: float,
                rng: np.random.Generator) -> Iterator[RequestSpec]:
    """Request i is a score when floor((i + 1) f) > floor(i f): the scores spread evenly at fraction f;
    the chat requests alternate streaming and non-streaming, streaming first."""
    chats = bench.request_specs(chat, rng, SharedPrefix(0, chat.id_range))
    scores = bench.request_specs(score, rng, SharedPrefix(1, score.id_range))
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


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def plan_from_args(args) -> SoakPlan:
    """Validate the options as a whole; UsageError names the option at fault."""
    _check(args.duration > 0, "--duration must be > 0")
    _check(args.concurrency >= 1, "--concurrency must be >= 1")
    _check(0.0 <= args.score_fraction <= 1.0, "--score-fraction must be in [0, 1]")
    _check(args.max_requests is None or args.max_requests >= 1, "--max-requests must be >= 1")
    _check(min(args.max_tokens, args.input_len, args.query_tokens, args.num_items, args.item_tokens) >= 1,
           "--max-tokens, --input-len, --query-tokens, --num-items and --item-tokens must be >= 1")
    _check(args.timeout > 0, "--timeout must be > 0")
    _check(args.time_limit is None or args.time_limit > 0, "--time-limit must be > 0")
    _check(args.progress_interval > 0, "--progress-interval must be > 0")
    _check(0.0 <= args.max_error_rate <= 1.0, "--max-error-rate must be in [0, 1]")
    _check(args.vocab_size is None or args.vocab_size > 4, "--vocab-size must be > 4")
    try:
        label_ids = tuple(int(v) for v in args.label_token_ids.split(","))
    except ValueError:
        raise UsageError(f"--label-token-ids: expected comma-separated integers, "
                         f"got {args.label_token_ids!r}") from None
    _check(args.vocab_size is None or all(0 <= t < args.vocab_size for t in label_ids),
           "--label-token-ids must lie in [0, --vocab-size)")
    fixed_output = bench.LengthDist("fixed", args.max_tokens)
    chat = Workload(kind="generate", api="chat", prompt_format="text",
                    input_len=bench.LengthDist("fixed", args.input_len), output_len=fixed_output,
                    model=args.model)
    score = Workload(kind="score", api="completions", prompt_format="ids",
                     input_len=bench.LengthDist("fixed", args.query_tokens),
                     output_len=fixed_output, id_range=bench.prompt_id_range(args.vocab_size),
                     model=args.model, query_tokens=args.query_tokens, num_items=args.num_items,
                     item_tokens=args.item_tokens, label_token_ids=label_ids)
    config = {k: v for k, v in vars(args).items()
              if k not in ("func", "command") and isinstance(v, (str, int, float, bool, type(None)))}
    return SoakPlan(base_url=bench._base_url(args.url), chat=chat, score=score,
                    score_fraction=args.score_fraction, concurrency=args.concurrency,
                    duration_s=args.duration, max_requests=args.max_requests, timeout_s=args.timeout,
                    time_limit_s=args.time_limit or args.duration + args.timeout,
                    progress_interval_s=args.progress_interval, max_error_rate=args.max_error_rate,
                    json_path=args.json, seed=args.seed, config=config)


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


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


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
                     + "".join(f"{_ms(m[k]):>10}" for k in ("p50", "p90", "p99")))
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
            model = await bench.discover_model(session, plan.base_url, min(plan.timeout_s, 10.0))
            chat, score = dataclasses.replace(chat, model=model), dataclasses.replace(score, model=model)
        tally = Tally(time.perf_counter())

        async def send(spec: RequestSpec, rec: RequestRecord) -> None:
            kind = kind_of(spec)
            tagged.append((kind, rec))
            try:
                await send_any(session, plan.base_url, spec, rec, plan.timeout_s)
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
            phase = await bench.run_phase(send, mixed_specs(chat, score, plan.score_fraction, rng),
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
    if plan.json_path:
        with open(plan.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


def main_from_args(args) -> int:
    return asyncio.run(run_soak(args))
