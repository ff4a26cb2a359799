"""`kvloom faults`: a release gate for failure handling, run over HTTP against a kvloom server started
with --enable-fault-injection (which also turns on /admin/restart).

Each scenario runs on the one server, in order:
  before      N requests (streaming and non-streaming chat, alternating): all must complete
  fault       the fault is armed through POST /admin/faults under concurrent load; every request's
              outcome is kept: ok, an explicit error (an HTTP error or an SSE error event, with its
              code), or hung (no answer within --timeout)
  no restart  N more requests, then GET /health and /ready
  restart     POST /admin/faults {"kind": "clear"} (it also releases a hung step and reports how many
              faults fired), then POST /admin/restart
  after       N requests after the restart: all must complete

What each scenario must show to pass:
  raise, kill, hang   armed with after_steps so they fire mid-load: the load ends with no hung request,
                      every failure 503 engine_unavailable and at least one; then N of N requests refused
                      with 503 engine_unavailable within --at-once seconds each; /health and /ready 503;
                      the restart answers 200; N of N complete after it. The hang is ended by the server's
                      watchdog: start it with a short --step-timeout, well under --timeout.
  fail_request,       one streamed request of the load is failed (its row refused, or its logits made
  nan_request         non-finite): it alone ends with request_failed, the rest complete, the engine
                      carries on (N of N complete, /health and /ready 200); no restart is needed.
  fail_warmup         a restart whose warm-up fails answers 503 (degraded); N of N requests are refused
                      with 503 engine_not_ready at once; /health 200, /ready 503; a second restart
                      answers 200; N of N complete after it.

Per-request faults need the engine's request id, which a client is not given as such: kvloom names
choice i of a response "<response id>-<i>", and a streamed chat response sends its id in its first
event (the role delta) as soon as the request is queued, so the gate arms the fault on "<id>-0" while
that request (with a longer max_tokens) still runs. A server that names its requests otherwise never
fires the fault, and the scenario fails with that note.

Exit code: 0 when every scenario passes, 1 when any fails, 2 for usage errors or an unreachable server
(or one without fault injection).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

import aiohttp
import orjson

from kvloom.tools.command_args import FAULT_SCENARIOS, UsageError, options_json
from kvloom.tools.http_client import (base_url, discover_model, read_stream, request_json, send_request,
                                      sse_data,
                                      stream_error)
from kvloom.tools.report import format_table, write_json
from kvloom.tools.slo import RequestRecord
from kvloom.tools.workload import RequestSpec

ENGINE_FAULTS = ("raise", "kill", "hang")
ROW_FAULTS = ("fail_request", "nan_request")
WARMUP_FAULTS = ("fail_warmup",)
SCENARIOS = FAULT_SCENARIOS  # the three groups above, as --scenarios names them
UNAVAILABLE = "engine_unavailable"
REQUEST_FAILED = "request_failed"
NOT_READY = "engine_not_ready"


@dataclass(frozen=True)
class Outcome:
    """One request as the gate saw it: error None when it completed, else a tools.http_client error type
    ("http_503:engine_unavailable", "stream_error:engine_unavailable", "timeout", ...)."""

    error: Optional[str]
    seconds: float
    is_target: bool = False  # the request a per-request fault was armed on

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def is_hung(self) -> bool:
        return self.error in ("timeout", "time_limit")

    @property
    def code(self) -> Optional[str]:
        """The server's error code of an explicit error ("engine_unavailable"), else None."""
        if self.error and self.error.startswith(("http_", "stream_error")) and ":" in self.error:
            return self.error.split(":", 1)[1]
        return None


@dataclass
class ScenarioResult:
    scenario: str
    num_requests: int
    before_ok: int = 0
    during_ok: Optional[int] = None  # None: the scenario has no load under the fault (fail_warmup)
    during_errors: Optional[int] = None  # explicit errors
    during_hung: Optional[int] = None
    during_other: Optional[int] = None  # failures that are neither explicit nor hung
    error_types: dict = field(default_factory=dict)  # during the fault: error type -> count
    fired: Optional[bool] = None  # as /admin/faults counts
    no_restart_ok: int = 0
    no_restart_errors: int = 0  # explicit errors with the code the scenario expects
    no_restart_max_s: Optional[float] = None
    health: Optional[int] = None
    ready: Optional[int] = None
    fault_restart: Optional[int] = None  # fail_warmup: the restart whose warm-up fails
    restart: Optional[int] = None  # None: no restart needed (per-request faults)
    after_ok: Optional[int] = None
    notes: list = field(default_factory=list)  # every failed expectation, in words

    @property
    def passed(self) -> bool:
        return not self.notes

    def expect(self, condition: bool, note: str) -> None:
        if not condition:
            self.notes.append(note)

    def record_during(self, outcomes: list[Outcome]) -> None:
        self.during_ok = sum(o.is_ok for o in outcomes)
        self.during_errors = sum(o.code is not None for o in outcomes)
        self.during_hung = sum(o.is_hung for o in outcomes)
        self.during_other = len(outcomes) - self.during_ok - self.during_errors - self.during_hung
        self.error_types = dict(sorted(Counter(o.error for o in outcomes if not o.is_ok).items()))

    def to_json(self) -> dict:
        return dict(asdict(self), passed=self.passed)


@dataclass(frozen=True)
class GatePlan:
    base_url: str
    scenarios: tuple[str, ...]
    num_requests: int  # before, without restart, after restart
    load_requests: int  # concurrent requests under an engine-wide fault
    row_requests: int  # concurrent requests, one of them failed, under a per-request fault
    max_tokens: int
    after_steps: Optional[int]  # None: half the steps the load should take
    timeout_s: float
    restart_timeout_s: float
    at_once_s: float
    json_path: Optional[str]
    config: dict


def plan_from_args(args) -> GatePlan:
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if not scenarios or unknown:
        raise UsageError(f"--scenarios: expected some of {','.join(SCENARIOS)}, got {args.scenarios!r}")
    if len(set(scenarios)) != len(scenarios):
        raise UsageError("--scenarios: a scenario is given twice")
    for name in ("requests", "load_requests", "row_requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.row_requests < 2:
        raise UsageError("--row-requests must be >= 2 (the failed request and at least one good one)")
    if args.after_steps is not None and args.after_steps < 0:
        raise UsageError("--after-steps must be >= 0")
    if min(args.timeout, args.restart_timeout, args.at_once) <= 0:
        raise UsageError("--timeout, --restart-timeout and --at-once must be > 0")
    return GatePlan(base_url=base_url(args.url), scenarios=scenarios, num_requests=args.requests,
                    load_requests=args.load_requests, row_requests=args.row_requests,
                    max_tokens=args.max_tokens, after_steps=args.after_steps, timeout_s=args.timeout,
                    restart_timeout_s=args.restart_timeout,
                    at_once_s=args.at_once, json_path=args.json, config=options_json(args))


# ---- the client ---------------------------------------------------------------------------------

class Client:
    """Chat requests and admin calls against one server; every request is bounded by --timeout."""

    def __init__(self, session: aiohttp.ClientSession, plan: GatePlan, model: Optional[str]):
        self.session, self.plan, self.model = session, plan, model
        self.url = plan.base_url
        self.num_sent = 0  # every prompt differs

    def spec(self, stream: bool, max_tokens: int) -> RequestSpec:
        self.num_sent += 1
        body = {"messages": [{"role": "user", "content": f"Request {self.num_sent}: tell a long story."}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
        if self.model is not None:
            body["model"] = self.model
        if stream:
            body["stream_options"] = {"include_usage": True}
        return RequestSpec("/v1/chat/completions", body, is_stream=stream)

    async def request(self, spec: RequestSpec) -> Outcome:
        rec = RequestRecord()
        start = time.perf_counter()
        await send_request(self.session, self.url, spec, rec, self.plan.timeout_s)
        return Outcome(rec.error, time.perf_counter() - start)

    async def batch(self, n: int) -> list[Outcome]:
        """n concurrent requests, streaming and non-streaming alternating."""
        return list(await asyncio.gather(*[self.request(self.spec(i % 2 == 0, self.plan.max_tokens))
                                           for i in range(n)]))

    async def targeted(self, kind: str, max_tokens: int) -> tuple[Outcome, bool]:
        """A streamed request that arms `kind` on its own engine request id (see the module docstring)
        as soon as its first event names it; (its outcome, whether the fault was armed)."""
        rec, armed = RequestRecord(), []

        async def read(resp: aiohttp.ClientResponse, rec: RequestRecord, spec: RequestSpec,
                       start: float) -> None:
            event = None
            while event is None:
                line = await resp.content.readline()
                if not line:
                    rec.error = "incomplete_stream"
                    return
                event = sse_data(line)
            first = orjson.loads(event)
            rec.error = stream_error(first)
            if rec.error:
                return
            status, _ = await self.admin("/admin/faults", {"kind": kind, "request_id": f"{first['id']}-0"})
            armed.append(status == 200)
            await read_stream(resp, rec, spec, start)

        start = time.perf_counter()
        await send_request(self.session, self.url, self.spec(True, max_tokens), rec, self.plan.timeout_s,
                           read)
        return Outcome(rec.error, time.perf_counter() - start, is_target=True), bool(armed and armed[0])

    async def get(self, path: str) -> tuple[Optional[int], dict]:
        """(status, JSON body) of GET path; (None, {}) when there is no answer."""
        return await request_json(self.session, "GET", self.url + path, timeout_s=self.plan.timeout_s)

    async def admin(self, path: str, body: Optional[dict] = None,
                    timeout_s: Optional[float] = None) -> tuple[Optional[int], dict]:
        """(status, JSON body) of POST path; (None, {}) when there is no answer."""
        return await request_json(self.session, "POST", self.url + path, body,
                                  timeout_s=timeout_s or self.plan.timeout_s)

    async def restart(self) -> Optional[int]:
        status, _ = await self.admin("/admin/restart", timeout_s=self.plan.restart_timeout_s)
        return status

    async def clear(self) -> Optional[int]:
        """Disarm every fault and release a hung step; the number of faults fired so far, or None."""
        status, body = await self.admin("/admin/faults", {"kind": "clear"})
        return body.get("fired") if status == 200 else None


# ---- scenarios ----------------------------------------------------------------------------------

async def _before(client: Client, r: ScenarioResult) -> None:
    n = r.num_requests
    r.before_ok = sum(o.is_ok for o in await client.batch(n))
    r.expect(r.before_ok == n, f"before the fault only {r.before_ok}/{n} requests completed")


async def _no_restart(client: Client, r: ScenarioResult, refused_with: Optional[str]) -> None:
    """N requests with no restart: all refused at once with code `refused_with`, or (None) all ok."""
    n = r.num_requests
    outcomes = await client.batch(n)
    r.no_restart_ok = sum(o.is_ok for o in outcomes)
    r.no_restart_errors = sum(o.code == refused_with for o in outcomes) if refused_with else 0
    r.no_restart_max_s = max(o.seconds for o in outcomes)
    if refused_with is None:
        r.expect(r.no_restart_ok == n, f"without a restart only {r.no_restart_ok}/{n} requests completed")
        return
    r.expect(r.no_restart_errors == n, f"without a restart {r.no_restart_errors}/{n} requests were refused "
                                       f"with {refused_with} (got {Counter(o.error for o in outcomes)})")
    r.expect(r.no_restart_max_s <= client.plan.at_once_s,
             f"refusals took up to {r.no_restart_max_s:.2f} s "
             f"(more than --at-once {client.plan.at_once_s:g} s)")


async def _health(client: Client, r: ScenarioResult, health: int, ready: int) -> None:
    r.health, _ = await client.get("/health")
    r.ready, _ = await client.get("/ready")
    r.expect((r.health, r.ready) == (health, ready),
             f"/health and /ready answered {r.health}/{r.ready}, expected {health}/{ready}")


async def _restart_then_after(client: Client, r: ScenarioResult) -> None:
    n = r.num_requests
    r.restart = await client.restart()
    r.expect(r.restart == 200, f"POST /admin/restart answered {r.restart}, expected 200")
    r.after_ok = sum(o.is_ok for o in await client.batch(n))
    r.expect(r.after_ok == n, f"after the restart only {r.after_ok}/{n} requests completed")


def _check_fired(r: ScenarioResult, fired_before: Optional[int], fired_after: Optional[int],
                 hint: str) -> None:
    r.fired = fired_before is not None and fired_after is not None and fired_after > fired_before
    r.expect(r.fired, f"the fault did not fire ({hint})")


async def engine_fault(client: Client, kind: str, after_steps: int) -> ScenarioResult:
    """raise, kill or hang, fired mid-load: the engine fails, refuses at once, and restarts."""
    r = ScenarioResult(kind, client.plan.num_requests)
    await _before(client, r)
    fired_before = await client.clear()
    status, _ = await client.admin("/admin/faults", {"kind": kind, "after_steps": after_steps})
    r.expect(status == 200, f"arming {kind} answered {status}")
    r.record_during(await client.batch(client.plan.load_requests))
    r.expect(r.during_hung == 0, f"{r.during_hung} requests hung past --timeout {client.plan.timeout_s:g} s"
                                 + (" (is the server's --step-timeout shorter?)" if kind == "hang" else ""))
    r.expect(r.during_other == 0, f"{r.during_other} requests failed without an explicit error")
    codes = {o.split(":", 1)[1] for o in r.error_types if ":" in o} - {UNAVAILABLE}
    r.expect(not codes, f"errors other than {UNAVAILABLE}: {sorted(codes)}")
    r.expect(r.during_errors > 0, f"no request of the load failed: lower --after-steps ({after_steps})")
    await _no_restart(client, r, UNAVAILABLE)
    await _health(client, r, 503, 503)
    _check_fired(r, fired_before, await client.clear(), f"after_steps {after_steps}")
    await _restart_then_after(client, r)
    return r


async def row_fault(client: Client, kind: str, target_tokens: int) -> ScenarioResult:
    """fail_request or nan_request on one streamed request among row_requests: it alone fails."""
    r = ScenarioResult(kind, client.plan.num_requests)
    await _before(client, r)
    fired_before = await client.clear()
    (target, armed), others = await asyncio.gather(client.targeted(kind, target_tokens),
                                                   client.batch(client.plan.row_requests - 1))
    r.expect(armed, f"arming {kind} on the streamed request's id failed")
    r.record_during([target, *others])
    r.expect(r.during_hung == 0, f"{r.during_hung} requests hung past --timeout {client.plan.timeout_s:g} s")
    r.expect(target.code == REQUEST_FAILED, f"the targeted request ended with {target.error or 'ok'}, "
                                            f"expected {REQUEST_FAILED}")
    bad = sum(not o.is_ok for o in others)
    r.expect(bad == 0, f"{bad} requests other than the targeted one failed")
    await _no_restart(client, r, None)
    await _health(client, r, 200, 200)
    _check_fired(r, fired_before, await client.clear(),
                 "the engine request id is not '<response id>-0', or the request finished first")
    return r


async def warmup_fault(client: Client) -> ScenarioResult:
    """fail_warmup: a restart whose warm-up fails leaves the engine degraded; a second one recovers."""
    r = ScenarioResult("fail_warmup", client.plan.num_requests)
    await _before(client, r)
    fired_before = await client.clear()
    status, _ = await client.admin("/admin/faults", {"kind": "fail_warmup"})
    r.expect(status == 200, f"arming fail_warmup answered {status}")
    r.fault_restart = await client.restart()
    r.expect(r.fault_restart == 503, f"the restart with a failing warm-up answered {r.fault_restart}, "
                                     "expected 503")
    await _no_restart(client, r, NOT_READY)
    await _health(client, r, 200, 503)
    _check_fired(r, fired_before, await client.clear(), "warm-up did not run")
    await _restart_then_after(client, r)
    return r


async def run_scenario(client: Client, kind: str, status: dict) -> ScenarioResult:
    """One scenario, from a READY server (a server left failed by an earlier one is restarted first)."""
    code, _ = await client.get("/ready")
    if code != 200:
        await client.clear()
        await client.restart()
        code, _ = await client.get("/ready")
    if code != 200:
        r = ScenarioResult(kind, client.plan.num_requests)
        r.notes.append(f"the server was not ready before the scenario (/ready {code})")
        return r
    config = status.get("config") or {}
    if kind in ENGINE_FAULTS:
        after_steps = client.plan.after_steps
        if after_steps is None:  # about half the decode steps of the load
            waves = math.ceil(client.plan.load_requests / max(1, config.get("max_running") or 1))
            after_steps = max(1, waves * client.plan.max_tokens // 2)
        return await engine_fault(client, kind, after_steps)
    if kind in ROW_FAULTS:
        target_tokens = 4 * client.plan.max_tokens  # still running when the fault is armed
        if config.get("max_model_len"):
            target_tokens = min(target_tokens, config["max_model_len"] // 2)
        return await row_fault(client, kind, target_tokens)
    return await warmup_fault(client)


# ---- report -------------------------------------------------------------------------------------

COLUMNS = ("scenario", "before", "fault ok/err/hung", "error type", "no restart", "health/ready", "restart",
           "after", "verdict")


def _cells(r: ScenarioResult) -> list[str]:
    n = r.num_requests
    during = "-" if r.during_ok is None else f"{r.during_ok}/{r.during_errors}/{r.during_hung}"
    if r.during_other:
        during += f" +{r.during_other}?"
    codes = sorted({e.split(":", 1)[1] if ":" in e else e for e in r.error_types})
    if r.scenario in ROW_FAULTS:
        no_restart = f"{r.no_restart_ok}/{n} ok"
    else:
        at_once = "" if r.no_restart_max_s is None else f" {r.no_restart_max_s:.2f}s"
        no_restart = f"{r.no_restart_errors}/{n} err{at_once}"
    restart = "n/a" if r.restart is None and r.scenario in ROW_FAULTS else str(r.restart)
    if r.fault_restart is not None:
        restart = f"{r.fault_restart},{r.restart}"
    return [r.scenario, f"{r.before_ok}/{n}", during, ",".join(codes) or "-", no_restart,
            f"{r.health}/{r.ready}", restart, "n/a" if r.after_ok is None else f"{r.after_ok}/{n}",
            "PASS" if r.passed else "FAIL"]


def results_table(results: list[ScenarioResult]) -> str:
    """One row per scenario, columns as wide as their widest cell; the notes of failed ones below."""
    lines = format_table([list(COLUMNS)] + [_cells(r) for r in results], num_left=len(COLUMNS))
    for r in results:
        for note in r.notes:
            lines.append(f"  {r.scenario}: {note}")
    return "\n".join(lines)


async def run_gate(args) -> int:
    """The async entry point: every scenario in turn, the table, --json; the exit code."""
    try:
        plan = plan_from_args(args)
    except UsageError as exc:
        print(f"kvloom faults: error: {exc}", file=sys.stderr)
        return 2
    results: list[ScenarioResult] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        model = await discover_model(session, plan.base_url, min(plan.timeout_s, 10.0))
        client = Client(session, plan, model)
        code, status = await client.get("/status")
        if code != 200:
            print(f"kvloom faults: error: GET {plan.base_url}/status answered {code}", file=sys.stderr)
            return 2
        if await client.clear() is None:
            print(f"kvloom faults: error: POST {plan.base_url}/admin/faults failed: start the server with "
                  "--enable-fault-injection", file=sys.stderr)
            return 2
        print(f"kvloom faults: {plan.base_url} (model {model}), {plan.num_requests} requests per check",
              file=sys.stderr)
        for kind in plan.scenarios:
            start = time.perf_counter()
            result = await run_scenario(client, kind, status)
            results.append(result)
            print(f"kvloom faults: {kind} {'PASS' if result.passed else 'FAIL'} "
                  f"in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        await client.clear()
    passed = all(r.passed for r in results)
    print(results_table(results))
    print(f"kvloom faults: {'PASS' if passed else 'FAIL'} "
          f"({sum(r.passed for r in results)}/{len(results)} scenarios passed)")
    write_json(plan.json_path, {"url": plan.base_url, "model": model, "config": plan.config,
                                "scenarios": [r.to_json() for r in results], "passed": passed})
    return 0 if passed else 1


def main_from_args(args) -> int:
    return asyncio.run(run_gate(args))
