"""One trial of `kvloom tune`: a real `kvloom serve` with the trial's flags, warmed up, benchmarked with
`kvloom bench`, stopped.

    start    `kvloom serve --port 0 ...` in its own session (a Ctrl-C in the terminal reaches the tuner
             only, and the tuner stops the server); its output is kept in a log file and a tail
    warm-up  wait for the server's state line ("kvloom: ready (...)") and a 200 from /ready, bounded by
             its own timeout; the time is recorded as warmup_s, never charged to the benchmark
    bench    `kvloom bench --url ... --json ...` as a subprocess, bounded by the bench timeout
    stop     SIGTERM to the server's PID, SIGKILL after the stop timeout; always, whatever happened

Anything that goes wrong (the server exits, warm-up fails or times out, the benchmark fails, times out
or the server dies under it) gives a failed `TrialRun` with its reason and the log tail: no figures are
made up. A timeout kills the process it timed out. Cancellation (Ctrl-C) stops both processes before it
propagates.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import aiohttp

LOG_TAIL_LINES = 40
_CLI = (sys.executable, "-m", "kvloom.tools.cli")


class TrialFailure(Exception):
    """A trial that cannot give figures; the message is the recorded reason."""


@dataclass
class TrialRun:
    is_ok: bool
    reason: Optional[str] = None
    report: Optional[dict] = None  # the `kvloom bench --json` report
    warmup_s: Optional[float] = None
    bench_s: Optional[float] = None
    server_pid: Optional[int] = None
    log_tail: str = ""
    log_path: Optional[str] = None


@dataclass
class Server:
    """A `kvloom serve` child, its output pumped into a log file and a tail."""

    proc: asyncio.subprocess.Process
    log_path: str
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))
    url: Optional[str] = None
    state_line: Optional[str] = None
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the engine left warm-up (any state)
    pump: Optional[asyncio.Task] = None

    async def _pump(self) -> None:
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            while line := await self.proc.stdout.readline():
                text = line.decode(errors="replace").rstrip("\n")
                log.write(text + "\n")
                log.flush()
                self.tail.append(text)
                if text.startswith("kvloom: listening on "):
                    self.url = text.split("kvloom: listening on ", 1)[1].strip()
                    self.listening.set()
                elif text.startswith("kvloom: ") and self.listening.is_set() and not self.started.is_set():
                    self.state_line = text[len("kvloom: "):]
                    self.started.set()

    def tail_text(self) -> str:
        return "\n".join(self.tail)


def _stop_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the tuner dies, even by SIGKILL, so no server
    outlives it. Elsewhere a no-op: the tuner's own stop path is the rule, this is the safety net."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def start_server(serve_argv: Sequence[str], log_path: str, env: Optional[dict] = None) -> Server:
    proc = await asyncio.create_subprocess_exec(
        *_CLI, "serve", *serve_argv, "--host", "127.0.0.1", "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, preexec_fn=_stop_with_parent, env=env)
    server = Server(proc, log_path)
    server.pump = asyncio.ensure_future(server._pump())
    return server


async def _until_exit_or(event: asyncio.Event, proc: asyncio.subprocess.Process) -> bool:
    """Wait for `event` or the process's exit; True when the event came first."""
    waiter, exited = asyncio.ensure_future(event.wait()), asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
        return event.is_set()
    finally:
        waiter.cancel()
        exited.cancel()


async def wait_ready(server: Server) -> None:
    """Until the engine is READY and /ready says 200; TrialFailure otherwise. The caller bounds it."""
    if not await _until_exit_or(server.listening, server.proc):
        raise TrialFailure(f"the server exited with code {server.proc.returncode} during start-up")
    if not await _until_exit_or(server.started, server.proc):
        raise TrialFailure(f"the server exited with code {server.proc.returncode} during warm-up")
    if not server.state_line.startswith("ready"):
        raise TrialFailure(f"the engine did not become ready: {server.state_line}")
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/ready", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise TrialFailure(f"/ready answered {resp.status}: {await resp.text()}")


async def stop_process(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """SIGTERM to this process's PID, SIGKILL after timeout_s; returns once it has exited."""
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.shield(proc.wait()), timeout_s)
    except asyncio.TimeoutError:
        pass
    except ProcessLookupError:
        return
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def run_bench(url: str, bench_argv: Sequence[str], json_path: str, server: Server,
                    timeout_s: float) -> dict:
    """`kvloom bench` against the server; its JSON report. Exit codes 0 and 1 (an SLO failed) both
    give a report; anything else, a timeout or the server dying first is a TrialFailure."""
    bench = await asyncio.create_subprocess_exec(
        *_CLI, "bench", "--url", url, "--json", json_path, "--no-progress", *bench_argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, preexec_fn=_stop_with_parent)
    output = asyncio.ensure_future(bench.communicate())
    server_exit = asyncio.ensure_future(server.proc.wait())
    try:
        done, _ = await asyncio.wait({output, server_exit}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if output not in done:
            reason = (f"the server exited with code {server.proc.returncode} during the benchmark"
                      if server_exit in done else f"the benchmark timed out after {timeout_s:g} s")
            raise TrialFailure(reason)
        text = output.result()[0].decode(errors="replace")
        if bench.returncode not in (0, 1) or not os.path.exists(json_path):
            last = "\n".join(text.strip().splitlines()[-5:])
            raise TrialFailure(f"kvloom bench exited with code {bench.returncode}: {last}")
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        server_exit.cancel()
        output.cancel()
        await stop_process(bench, 5.0)


async def run_trial(serve_argv: Sequence[str], bench_argv: Sequence[str], work_dir: str, *,
                    warmup_timeout_s: float, bench_timeout_s: float, stop_timeout_s: float,
                    on_phase=lambda phase: None, on_server=lambda pid: None) -> TrialRun:
    """Start, warm up, benchmark and stop one server; the outcome, failed or not. on_phase(name) is told
    each phase, on_server(pid) the server's PID once it runs."""
    os.makedirs(work_dir, exist_ok=True)
    log_path = os.path.join(work_dir, "serve.log")
    run = TrialRun(is_ok=False, log_path=log_path)
    on_phase("start")
    server = await start_server(serve_argv, log_path)
    run.server_pid = server.proc.pid
    try:
        on_server(server.proc.pid)
        on_phase("warm-up")
        start = time.perf_counter()
        try:
            await asyncio.wait_for(wait_ready(server), warmup_timeout_s)
        except asyncio.TimeoutError:
            raise TrialFailure(f"warm-up timed out after {warmup_timeout_s:g} s") from None
        run.warmup_s = time.perf_counter() - start
        on_phase("bench")
        start = time.perf_counter()
        run.report = await run_bench(server.url, bench_argv, os.path.join(work_dir, "bench.json"), server,
                                     bench_timeout_s)
        run.bench_s = time.perf_counter() - start
        run.is_ok = True
    except TrialFailure as exc:
        run.reason = str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        run.reason = f"{type(exc).__name__}: {exc}"
    finally:
        on_phase("stop")
        await stop_process(server.proc, stop_timeout_s)
        if server.pump is not None:
            await asyncio.gather(server.pump, return_exceptions=True)
        run.log_tail = server.tail_text()
    return run
