"""Time to /ready: `kvloom serve` started as a user starts it, N times in a row, with the engine's own
breakdown of each start (`/status` start: phases and detail).

    python -m kvloom.tools.start_time [--runs 2] [--fresh-cache] [--timeout 600] -- [serve flags]

With --fresh-cache the runs share a new, empty start cache (the compile cache, the converted weights,
the GGUF tokenizer), so the first run is a cold start and the others warm ones; without it they use
the serve flags' --compile-cache (default ~/.cache/kvloom/jax) as it is. Each run is a fresh process:
spawned, timed until /ready answers 200, its /status read, then stopped (tools.tune_trial's helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import aiohttp

from kvloom.tools.tune_trial import TrialFailure, start_server, stop_process, wait_ready


async def one_start(serve_argv: list[str], log_path: str, timeout_s: float, env: dict) -> dict:
    """Spawn, wait for READY and a 200 from /ready, read /status, stop: seconds to ready and the start."""
    t0 = time.perf_counter()
    server = await start_server(serve_argv, log_path, env=env)
    try:
        await asyncio.wait_for(wait_ready(server), timeout_s)
        ready_s = time.perf_counter() - t0
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/status") as resp:
                status = await resp.json()
        return {"ready_s": ready_s, "start": status.get("start") or {}}
    finally:
        await stop_process(server.proc, 30.0)
        if server.pump is not None:
            await asyncio.gather(server.pump, return_exceptions=True)


def report(run: int, result: dict) -> str:
    start = result["start"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in start.get("phases", {}).items())
    detail = start.get("detail", {})
    counts = (f"; executables {detail['executables_loaded']} loaded, {detail['executables_compiled']} "
              f"compiled" if "executables_loaded" in detail else "")
    total = start.get("total_s") or 0.0
    rest = ", ".join(f"{k} {v}" for k, v in detail.items() if not k.startswith("executables_"))
    return (f"run {run}: /ready after {result['ready_s']:.1f}s "
            f"(engine start {total:.1f}s: {phases}{counts})\n       detail: {rest}")


async def main_async(args, serve_argv: list[str]) -> int:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="kvloom-start-") as tmp:
        if args.fresh_cache:
            serve_argv = [*serve_argv, "--compile-cache", os.path.join(tmp, "jax")]
            env["KVLOOM_CACHE_DIR"] = os.path.join(tmp, "kvloom")  # the GGUF tokenizer's cache too
        for run in range(1, args.runs + 1):
            try:
                result = await one_start(serve_argv, os.path.join(tmp, f"serve-{run}.log"), args.timeout, env)
            except (TrialFailure, asyncio.TimeoutError, aiohttp.ClientError) as exc:
                with open(os.path.join(tmp, f"serve-{run}.log"), errors="replace") as f:
                    tail = "".join(f.readlines()[-20:])
                print(f"run {run}: failed: {type(exc).__name__}: {exc}\n{tail}", file=sys.stderr)
                return 1
            print(report(run, result), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, serve_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m kvloom.tools.start_time", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=2, help="starts in a row (default 2)")
    p.add_argument("--fresh-cache", action="store_true",
                   help="the runs share a new, empty start cache: the first is a cold start")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one start may take (default 600)")
    args = p.parse_args(ours)
    return asyncio.run(main_async(args, serve_argv))


if __name__ == "__main__":
    sys.exit(main())
