"""`kvloom bench`: a serving load generator for any OpenAI-compatible server.

Data flow, per load point (one, or one per sweep value):
  args -> BenchPlan (validated once; UsageError -> exit 2)
  Workload + seeded RNG -> an endless stream of RequestSpecs (synthetic id or text prompts with a
      shared prefix, prompts from a JSONL file, or /v1/score bodies)
  run_phase: the warm-up requests, then the measured ones, sent by C closed-loop workers
      (--concurrency) or on a Poisson/constant arrival clock (--request-rate, optionally capped
      by --concurrency); each request's timing goes into a RequestRecord
  tools.slo.build_summary(records) -> the summary dict (counts, errors, throughput, latency
      percentiles, SLO verdicts) -> the stdout table, --json, --plot (tools.plot)

Timing is taken on the client with aiohttp directly: TTFT is send -> first non-empty content
chunk, ITL the gaps between content chunks, e2e send -> `data: [DONE]`. Output tokens come from the
final usage chunk (stream_options.include_usage) when the server sends one, else the chunk count.

Every run is bounded: --num-requests and/or --duration bound what is sent, --timeout each request,
and --time-limit each phase on the wall clock (requests still in flight then are cancelled and
counted as "time_limit" errors). Exit code: 0 when every SLO passes (or none is given), 1 when any
fails, 2 for usage errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import aiohttp
import numpy as np
import orjson

from kvloom.tools.command_args import DEFAULT_NUM_REQUESTS
from kvloom.tools.slo import SLO, RequestRecord, build_summary, parse_slos

PROMPT_ID_LOW, PROMPT_ID_HIGH = 100, 1000
DEFAULT_TIME_LIMIT_S = 600.0

# Common short English words: about one token each for the usual BPE vocabularies.
WORDS = tuple("""
the of and to in is that it for on with as was at by be this have from or one had not but what all
were when we there can an your which their said if do will each about how up out them then she many
some so these would other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little very after words called
just where most know get through back much before go good new write our used me man too any day same
right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell
men say small every found still between name should home big give air line set own under read last
never us left end along while might next sound below saw something thought both few those always
""".split())


class UsageError(ValueError):
    """A bad combination of options: reported on stderr, exit code 2."""


# ---- workload -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """Token counts: fixed (a), uniform integers in [a, b], or normal(mean a, std b); always >= 1."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "uniform":
            value = rng.integers(int(self.a), int(self.b) + 1)
        elif self.kind == "normal":
            value = round(rng.normal(self.a, self.b))
        else:
            value = self.a
        return max(1, int(value))

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform[{int(self.a)}, {int(self.b)}]"
        if self.kind == "normal":
            return f"normal({self.a:g}, {self.b:g})"
        return str(int(self.a))


def parse_length_dist(spec: str, base: int) -> LengthDist:
    """"fixed" | "uniform[:LO:HI]" | "normal[:STD]" | "normal:MEAN:STD" around the base length
    (uniform defaults to [base/2, 3*base/2], normal to std base/4)."""
    if base < 1:
        raise ValueError(f"the length must be >= 1, got {base}")
    kind, *params = spec.split(":")
    try:
        values = [float(p) for p in params]
    except ValueError:
        raise ValueError(f"length distribution {spec!r}: parameters must be numbers") from None
    if kind == "fixed" and not values:
        return LengthDist("fixed", base)
    if kind == "uniform" and len(values) in (0, 2):
        low, high = values or (max(1, base // 2), max(1, base * 3 // 2))
        if not 1 <= low <= high or low != int(low) or high != int(high):
            raise ValueError(f"length distribution {spec!r}: need integers 1 <= LO <= HI")
        return LengthDist("uniform", low, high)
    if kind == "normal" and len(values) <= 2:
        mean, std = values if len(values) == 2 else (base, values[0] if values else base / 4)
        if std < 0 or mean < 1:
            raise ValueError(f"length distribution {spec!r}: need MEAN >= 1 and STD >= 0")
        return LengthDist("normal", mean, std)
    raise ValueError(f"length distribution {spec!r}: expected fixed, uniform[:LO:HI], normal[:STD] "
                     "or normal:MEAN:STD")


def prompt_id_range(vocab_size: Optional[int]) -> tuple[int, int]:
    """[low, high) for synthetic prompt ids: [100, 1000), clipped to a small vocabulary."""
    high = PROMPT_ID_HIGH if vocab_size is None else min(PROMPT_ID_HIGH, vocab_size)
    low = PROMPT_ID_LOW if high > 2 * PROMPT_ID_LOW else min(3, high - 1)
    return low, high


@dataclass(frozen=True)
class Workload:
    kind: str  # "generate" or "score"
    api: str  # "completions" or "chat"
    prompt_format: str  # "ids" or "text"
    input_len: LengthDist
    output_len: LengthDist
    shared_prefix_ratio: float = 0.0
    id_range: tuple[int, int] = (PROMPT_ID_LOW, PROMPT_ID_HIGH)
    prompts: tuple = ()  # --prompts-file lines: {"prompt": str} or {"messages": [...]}
    extra_body: dict = field(default_factory=dict)
    model: Optional[str] = None
    query_tokens: int = 32
    num_items: int = 8
    item_tokens: int = 16
    label_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestSpec:
    path: str  # "/v1/completions", ...
    body: dict
    is_stream: bool
    num_items: int = 0


class SharedPrefix:
    """The common head of every synthetic prompt: one fixed seeded sequence, grown on demand, so any
    two prompts share min(their prefix lengths) tokens."""

    def __init__(self, seed: int, id_range: tuple[int, int]):
        self.rng = np.random.default_rng([seed, 1])
        self.id_range = id_range
        self.token_ids: list[int] = []
        self.words: list[str] = []

    def take_ids(self, n: int) -> list[int]:
        while len(self.token_ids) < n:
            self.token_ids.extend(self.rng.integers(*self.id_range, size=64).tolist())
        return self.token_ids[:n]

    def take_words(self, n: int) -> list[str]:
        while len(self.words) < n:
            self.words.extend(WORDS[i] for i in self.rng.integers(0, len(WORDS), size=64))
        return self.words[:n]


def synthetic_prompt(workload: Workload, rng: np.random.Generator, prefix: SharedPrefix, num_tokens: int):
    """Token ids (exact length) or text of about num_tokens words; the first
    round(shared_prefix_ratio * num_tokens) of them are the shared prefix."""
    num_shared = round(workload.shared_prefix_ratio * num_tokens)
    if workload.prompt_format == "ids":
        own = rng.integers(*workload.id_range, size=num_tokens - num_shared).tolist()
        return prefix.take_ids(num_shared) + own
    own_words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens - num_shared)]
    words = prefix.take_words(num_shared) + own_words
    return " ".join(words)


def _generation_spec(workload: Workload, max_tokens: int, prompt=None, messages=None) -> RequestSpec:
    """A streamed request; the bench's own fields win over --extra-body."""
    body = dict(workload.extra_body)
    if workload.model is not None:
        body["model"] = workload.model
    if workload.api == "chat":
        path = "/v1/chat/completions"
        body["messages"] = messages or [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    body.update(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    return RequestSpec(path, body, is_stream=True)


def _score_spec(workload: Workload, rng: np.random.Generator, prefix: SharedPrefix) -> RequestSpec:
    body = dict(workload.extra_body)
    if workload.model is not None:
        body["model"] = workload.model
    body["query"] = synthetic_prompt(workload, rng, prefix, workload.query_tokens)
    body["items"] = rng.integers(*workload.id_range, size=(workload.num_items, workload.item_tokens)).tolist()
    body["label_token_ids"] = list(workload.label_token_ids)
    return RequestSpec("/v1/score", body, is_stream=False, num_items=workload.num_items)


def request_specs(workload: Workload, rng: np.random.Generator,
                  prefix: SharedPrefix) -> Iterator[RequestSpec]:
    """The endless request stream of a workload: file prompts cycle in order."""
    for i in itertools.count():
        if workload.kind == "score":
            yield _score_spec(workload, rng, prefix)
        elif workload.prompts:
            line = workload.prompts[i % len(workload.prompts)]
            max_tokens = line.get("max_tokens") or workload.output_len.sample(rng)
            yield _generation_spec(workload, max_tokens, line.get("prompt"), line.get("messages"))
        else:
            prompt = synthetic_prompt(workload, rng, prefix, workload.input_len.sample(rng))
            yield _generation_spec(workload, workload.output_len.sample(rng), prompt)


def load_prompts_file(path: str, api: str) -> tuple:
    """JSONL, one {"prompt": str} or {"messages": [...]} (chat api only) per line; blank lines skipped."""
    prompts = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise UsageError(f"--prompts-file: {exc}") from None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--prompts-file {path}:{number}: not JSON: {exc}") from None
        if isinstance(line, dict) and isinstance(line.get("prompt"), str):
            prompts.append(line)
        elif isinstance(line, dict) and isinstance(line.get("messages"), list) and line["messages"]:
            if api != "chat":
                raise UsageError(f"--prompts-file {path}:{number}: a messages line needs --api chat")
            prompts.append(line)
        else:
            raise UsageError(f"--prompts-file {path}:{number}: expected {{\"prompt\": str}} or "
                             "{\"messages\": [...]}")
    if not prompts:
        raise UsageError(f"--prompts-file {path}: no prompts")
    return tuple(prompts)


# ---- one request --------------------------------------------------------------------------------

async def _http_error(resp: aiohttp.ClientResponse) -> str:
    """"http_STATUS:CODE" from OpenAI's error envelope, or "http_STATUS"."""
    code = None
    try:
        error = (await resp.json(content_type=None)).get("error")
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    except (ValueError, AttributeError, aiohttp.ClientError):
        pass
    return f"http_{resp.status}" + (f":{code}" if code else "")


def _sse_data(line: bytes) -> Optional[bytes]:
    line = line.strip()
    return line[5:].strip() if line.startswith(b"data:") else None


async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, start: float) -> None:
    chunk_times: list[float] = []
    usage_tokens = None
    buffer = b""
    end = None
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            event = _sse_data(line)
            if event is None or end is not None:
                continue
            if event == b"[DONE]":
                end = now
                continue
            obj = orjson.loads(event)
            if not isinstance(obj, dict):
                raise ValueError("an SSE event is not a JSON object")
            error = obj.get("error")
            if error:
                code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
                rec.error = "stream_error" + (f":{code}" if code else "")
                return
            usage = obj.get("usage")
            if isinstance(usage, dict):
                usage_tokens = usage.get("completion_tokens", usage_tokens)
                rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
            for choice in obj.get("choices") or ():
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunk_times.append(now)
                    break
    if end is None:
        rec.error = "incomplete_stream"
        return
    rec.e2e = end - start
    rec.ttft = chunk_times[0] - start if chunk_times else rec.e2e
    rec.itls = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    rec.output_tokens = usage_tokens if isinstance(usage_tokens, int) else len(chunk_times)


async def _read_score(resp: aiohttp.ClientResponse, rec: RequestRecord, spec: RequestSpec,
                      start: float) -> None:
    body = await resp.json(content_type=None)
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list) or len(scores) != spec.num_items:
        rec.error = "bad_response"
        return
    rec.e2e = time.perf_counter() - start
    rec.num_items = spec.num_items
    usage = body.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens")


async def send_request(session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, rec: RequestRecord,
                       timeout_s: float) -> None:
    """Send one request and fill `rec`; failures become rec.error, never exceptions (but
    cancellation)."""
    start = time.perf_counter()
    try:
        async with session.post(base_url + spec.path, data=orjson.dumps(spec.body),
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status >= 400:
                rec.error = await _http_error(resp)
            elif spec.is_stream:
                await _read_stream(resp, rec, start)
            else:
                await _read_score(resp, rec, spec, start)
    except asyncio.TimeoutError:  # aiohttp's timeouts subclass it
        rec.error = "timeout"
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
        rec.error = "connection_error"
    except aiohttp.ClientError:
        rec.error = "client_error"
    except (ValueError, TypeError, AttributeError):  # not JSON, or JSON of the wrong shape
        rec.error = "bad_response"


async def discover_model(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> Optional[str]:
    """The first model of GET /v1/models, or None (the body then names no model)."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.get(base_url + "/v1/models", timeout=timeout) as resp:
            if resp.status != 200:
                return None
            return (await resp.json(content_type=None))["data"][0]["id"]
    except (asyncio.TimeoutError, aiohttp.ClientError, ValueError, LookupError, TypeError):
        return None


# ---- load ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadPoint:
    """Closed loop with `concurrency` workers, or open loop at `request_rate` req/s (capped at
    `concurrency` in flight when both are set)."""

    concurrency: Optional[int] = None
    request_rate: Optional[float] = None
    arrival: str = "poisson"  # or "constant"

    @property
    def label(self) -> str:
        if self.request_rate is None:
            return f"c={self.concurrency}"
        return f"rate={self.request_rate:g}" + (f",c={self.concurrency}" if self.concurrency else "")

    def to_json(self) -> dict:
        return {"concurrency": self.concurrency, "request_rate": self.request_rate,
                "arrival": self.arrival if self.request_rate is not None else None}


@dataclass
class Phase:
    records: list[RequestRecord]
    duration_s: float
    is_time_limited: bool


async def run_phase(send: Callable, specs: Iterator[RequestSpec], load: LoadPoint, *,
                    num_requests: Optional[int], duration_s: Optional[float], time_limit_s: float,
                    rng: np.random.Generator, on_done: Callable[[], None] = lambda: None) -> Phase:
    """Send requests under `load` until num_requests were sent or duration_s passed, then wait for
    those in flight; past time_limit_s cancel them (they become "time_limit" errors).
    `send(spec, rec)` does one request."""
    records: list[RequestRecord] = []
    start = time.perf_counter()
    stop_sending_at = start + duration_s if duration_s else math.inf

    def next_spec() -> Optional[RequestSpec]:
        if num_requests is not None and len(records) >= num_requests:
            return None
        if time.perf_counter() >= stop_sending_at:
            return None
        return next(specs)

    async def one(spec: RequestSpec) -> None:
        rec = RequestRecord()
        records.append(rec)
        try:
            await send(spec, rec)
        except asyncio.CancelledError:
            rec.error = "time_limit"
            raise
        finally:
            on_done()

    tasks: set[asyncio.Task] = set()

    async def closed_loop() -> None:
        async def worker():
            while (spec := next_spec()) is not None:
                await one(spec)

        tasks.update(asyncio.ensure_future(worker()) for _ in range(load.concurrency))
        await asyncio.gather(*tasks)

    async def open_loop() -> None:
        in_flight = asyncio.Semaphore(load.concurrency) if load.concurrency else None
        send_at = time.perf_counter()
        while True:
            delay = send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight is not None:
                await in_flight.acquire()
            spec = next_spec()
            if spec is None:
                break
            task = asyncio.ensure_future(one(spec))
            tasks.add(task)
            if in_flight is not None:
                task.add_done_callback(lambda _: in_flight.release())
            gap = 1.0 / load.request_rate
            send_at += rng.exponential(gap) if load.arrival == "poisson" else gap
        await asyncio.gather(*tasks)

    is_time_limited = False
    try:
        await asyncio.wait_for(closed_loop() if load.request_rate is None else open_loop(), time_limit_s)
    except asyncio.TimeoutError:
        is_time_limited = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Phase(records, time.perf_counter() - start, is_time_limited)


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


def _number_list(text: str, kind, option: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option}: expected comma-separated positive numbers, got {text!r}")
    return values


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    _require(url.startswith(("http://", "https://")), f"--url: expected http(s)://HOST[:PORT], got {url!r}")
    return url[:-3] if url.endswith("/v1") else url


def _workload_from_args(args) -> Workload:
    kind = args.workload
    prompt_format = args.prompt_format or ("text" if args.api == "chat" and kind == "generate" else "ids")
    _require(not (args.api == "chat" and prompt_format == "ids" and kind == "generate"),
             "--prompt-format ids needs --api completions (chat messages are text)")
    _require(0.0 <= args.shared_prefix_ratio <= 1.0, "--shared-prefix-ratio must be in [0, 1]")
    _require(args.vocab_size is None or args.vocab_size > 4, "--vocab-size must be > 4")
    try:
        input_len = parse_length_dist(args.input_len_dist, args.input_len)
        output_len = parse_length_dist(args.output_len_dist, args.output_len)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        extra_body = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--extra-body: not JSON: {exc}") from None
    _require(isinstance(extra_body, dict), "--extra-body must be a JSON object")
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    label_ids = ()
    if kind == "score":
        _require(args.prompts_file is None, "--prompts-file does not apply to --workload score")
        _require(args.label_token_ids is not None, "--workload score needs --label-token-ids, e.g. 1,2")
        try:
            label_ids = tuple(int(v) for v in args.label_token_ids.split(","))
        except ValueError:
            raise UsageError(f"--label-token-ids: expected comma-separated integers, "
                             f"got {args.label_token_ids!r}") from None
        _require(min(args.query_tokens, args.num_items, args.item_tokens) >= 1,
                 "--query-tokens, --num-items and --item-tokens must be >= 1")
    prompts = load_prompts_file(args.prompts_file, args.api) if args.prompts_file else ()
    return Workload(kind=kind, api=args.api, prompt_format=prompt_format, input_len=input_len,
                    output_len=output_len, shared_prefix_ratio=args.shared_prefix_ratio,
                    id_range=prompt_id_range(args.vocab_size), prompts=prompts, extra_body=extra_body,
                    model=args.model, query_tokens=args.query_tokens, num_items=args.num_items,
                    item_tokens=args.item_tokens, label_token_ids=label_ids)


def _points_from_args(args) -> tuple[tuple[LoadPoint, ...], Optional[str]]:
    _require(not (args.sweep_concurrency and args.sweep_rate),
             "give --sweep-concurrency or --sweep-rate, not both")
    _require(args.concurrency is None or args.concurrency >= 1, "--concurrency must be >= 1")
    _require(args.request_rate is None or args.request_rate > 0, "--request-rate must be > 0")
    if args.sweep_concurrency:
        values = _number_list(args.sweep_concurrency, int, "--sweep-concurrency")
        return tuple(LoadPoint(c, args.request_rate, args.arrival) for c in values), "concurrency"
    if args.sweep_rate:
        values = _number_list(args.sweep_rate, float, "--sweep-rate")
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
    _require(args.num_requests is None or args.num_requests >= 1, "--num-requests must be >= 1")
    _require(args.duration is None or args.duration > 0, "--duration must be > 0")
    _require(args.warmup_requests >= 0, "--warmup-requests must be >= 0")
    _require(args.timeout > 0, "--timeout must be > 0")
    _require(args.time_limit is None or args.time_limit > 0, "--time-limit must be > 0")
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = DEFAULT_NUM_REQUESTS
    try:
        slos = tuple(parse_slos(args.slo)) if args.slo else ()
    except ValueError as exc:
        raise UsageError(f"--slo: {exc}") from None
    if workload.kind == "score":
        per_token = [s.name for s in slos if s.metric in ("ttft", "itl", "tpot")]
        _require(not per_token, f"--slo: {', '.join(per_token)} has no meaning for --workload score "
                                "(use e2e_* and error_rate)")
    if args.plot:
        _require(importlib.util.find_spec("matplotlib") is not None,
                 "--plot needs matplotlib: pip install 'kvloom[bench]'")
    time_limit = args.time_limit or default_time_limit(
        num_requests, args.duration, [p.request_rate for p in points if p.request_rate], args.timeout)
    config = {k: v for k, v in vars(args).items()
              if k not in ("func", "command") and isinstance(v, (str, int, float, bool, type(None)))}
    return BenchPlan(base_url=_base_url(args.url), workload=workload, points=points, sweep=sweep,
                     num_requests=num_requests, duration_s=args.duration,
                     warmup_requests=args.warmup_requests,
                     timeout_s=args.timeout, time_limit_s=time_limit, slos=slos, json_path=args.json,
                     plot_path=args.plot, seed=args.seed, show_progress=not args.no_progress, config=config)


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


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


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
        lines.append(f"  {metric:<14}" + "".join(f"{_ms(m[k]):>10}" for k in ("mean", "p50", "p90", "p99"))
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
                     f"{_ms(s['ttft_ms']['p50']):>10}{_ms(s['ttft_ms']['p99']):>10}"
                     f"{_ms(s['e2e_ms']['p50']):>10}{_ms(s['e2e_ms']['p99']):>10}{s['num_errors']:>8}  "
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
    if plan.json_path:
        with open(plan.json_path, "w") as f:
            json.dump(report, f, indent=2)
    if plan.plot_path:
        from kvloom.tools.plot import plot_sweep

        plot_sweep(plan.plot_path, runs, [s["label"] for s in runs], workload=workload.kind, slos=plan.slos)
        print(f"kvloom bench: plot written to {plan.plot_path}")
    if plan.slos:
        print(f"kvloom bench: SLOs {'passed' if passed else 'FAILED'}")
    return 0 if passed else 1


def main_from_args(args) -> int:
    return asyncio.run(run_bench(args))
