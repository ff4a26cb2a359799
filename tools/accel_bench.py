"""The accelerator benchmark: engine and scoring figures of a Qwen3-0.6B-shaped model (random weights,
built here) in bfloat16 and float32 on whatever device JAX finds, and one short summary.

    tools/accel_bench.sh [--tiny] [--dtypes bfloat16,float32] [--out DIR] [--checkpoint DIR]
    python -m kvloom.tools.accel_bench [the same]       (tools/accel_bench.sh also sets JAX up for a GPU)

Data flow: tools.random_checkpoint writes the checkpoint (once per shape and seed into a cache
directory, then reused) -> per dtype, each benchmark runs as its own process, so that a crash or an
out-of-memory ends that phase alone and the device memory is free for the next:
  score:  `python -m kvloom.tools.bench_score --min-items-per-s 400`: one query of 2,000 tokens with
          500 items of 20 tokens in the engine's default scoring mode (--score-modes), items/s and
          PASS/FAIL against the gate;
  engine: `python -m kvloom.tools.bench_engine`: decode tok/s at 1, 8 and 32 concurrent requests and a
          512-token prefill (its cold time to first token);
-> their --json reports, read back -> summary.txt (printed too) and summary.json. Everything is
written under the output directory: $OUT when set, else a fresh temporary directory; the processes'
output goes to accel_bench.log there. This process starts no JAX backend (it would take a GPU's
memory from the benchmark processes).

--tiny runs the same path with a 2-layer Qwen3 shape, small workloads and fewer step shapes to compile
(a CPU check; bfloat16 is slow on a CPU).
Exit status: 0 when every phase ran and the gate passed, 1 when the gate failed, 2 when a phase failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from kvloom.tools.command_args import comma_choices
from kvloom.tools.report import format_table, format_value, log
from kvloom.tools.random_checkpoint import SHAPES, build_shape

DTYPES = ("bfloat16", "float32")
MIN_ITEMS_PER_S = 400.0


@dataclass(frozen=True)
class Plan:
    """A checkpoint shape and each benchmark's workload; the flags of each benchmark (model, dtype,
    --json and --modes come on top) follow from it."""

    shape: str
    concurrency: tuple[int, ...]
    new_tokens: int
    prefill_tokens: int  # the long prompt of bench_engine's TTFT: its cold time is a prefill
    ttft_repeats: int
    query_tokens: int
    num_items: int
    item_tokens: int
    latency_items: tuple[int, ...]
    matmul_sizes: tuple[int, ...]
    engine_flags: tuple[str, ...] = ()  # engine size flags (tools.engine_args) of both benchmarks
    score_flags: tuple[str, ...] = ()  # bench_score's scoring flags
    timeout_s: float = 1200.0  # per benchmark process

    def engine_argv(self) -> list[str]:
        return ["--concurrency", _ints(self.concurrency), "--new-tokens", str(self.new_tokens),
                "--prompt-tokens", "32", "--long-prompt-tokens", str(self.prefill_tokens),
                "--ttft-repeats", str(self.ttft_repeats), "--no-hf",
                "--matmul-sizes", _ints(self.matmul_sizes), *self.engine_flags]

    def score_argv(self) -> list[str]:
        return ["--query-tokens", str(self.query_tokens), "--num-items", str(self.num_items),
                "--item-tokens", str(self.item_tokens), "--no-hf",
                "--latency-items", _ints(self.latency_items), "--requests-per-point", "2",
                "--matmul-sizes", _ints(self.matmul_sizes), "--min-items-per-s", f"{MIN_ITEMS_PER_S:g}",
                *self.engine_flags, *self.score_flags]


def _ints(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


FULL = Plan(shape="qwen3-0.6b", concurrency=(1, 8, 32), new_tokens=128, prefill_tokens=512, ttft_repeats=3,
            query_tokens=2000, num_items=500, item_tokens=20, latency_items=(10, 100, 500),
            matmul_sizes=(4096, 8192))
# The same path in a minute or two of CPU: fewer and smaller step shapes to compile, small workloads.
TINY = Plan(shape="tiny", concurrency=(1, 2, 4), new_tokens=8, prefill_tokens=128, ttft_repeats=1,
            query_tokens=200, num_items=50, item_tokens=20, latency_items=(10,), matmul_sizes=(128, 256),
            engine_flags=("--max-model-len", "512", "--max-tokens-per-step", "128", "--chunk-size", "64",
                          "--max-prefill-seqs", "2"),
            score_flags=("--tokens-per-step", "128"),
            timeout_s=600.0)
BENCHMARKS = {"score": "kvloom.tools.bench_score", "engine": "kvloom.tools.bench_engine"}


# ---- pure helpers -------------------------------------------------------------------------------

def phase_argv(plan: Plan, benchmark: str, model: str, dtype: str, json_path: str,
               extra: Sequence[str] = ()) -> list[str]:
    """The command line of one benchmark process."""
    flags = plan.engine_argv() if benchmark == "engine" else plan.score_argv()
    return [sys.executable, "-m", BENCHMARKS[benchmark], "--model", model, "--dtype", dtype,
            "--json", json_path, *flags, *extra]


def report_path(out_dir: str, benchmark: str, dtype: str) -> str:
    return os.path.join(out_dir, f"{benchmark}-{dtype}.json")


def summary_row(plan: Plan, dtype: str, engine: Optional[dict], score: Optional[dict]) -> dict:
    """One dtype's headline figures from its two reports (None: that phase gave no report)."""
    row = dict(dtype=dtype, decode_tok_s={}, prefill_ms=None, prefill_tok_s=None, score={}, gate=None)
    if engine is not None:
        row["decode_tok_s"] = {str(t["concurrency"]): t["kvloom_tok_s"] for t in engine["throughput"]}
        prefill = [t for t in engine["ttft"] if t["prompt_tokens"] == plan.prefill_tokens]
        if prefill:
            row["prefill_ms"] = prefill[0]["cold_s"] * 1e3
            row["prefill_tok_s"] = plan.prefill_tokens / prefill[0]["cold_s"]
    if score is not None:
        row["score"] = {t["mode"]: t["kvloom_items_per_s"] for t in score["throughput"]}
        row["gate"] = score.get("gate")
    return row


def gate_text(gate: Optional[dict]) -> str:
    if gate is None:
        return "-"
    return "PASS" if gate["passed"] else "FAIL"


def summary_lines(summary: dict) -> list[str]:
    """The printed summary: a title, one table row per dtype, the failed phases."""
    concurrency = [str(c) for c in summary["concurrency"]]
    header = (["dtype"] + [f"decode tok/s @{c}" for c in concurrency]
              + [f"prefill {summary['prefill_tokens']} (ms)", "prefill tok/s", "score items/s",
                 f"gate >= {summary['min_items_per_s']:g}"])
    cells = [header]
    for row in summary["rows"]:
        score = ", ".join(f"{format_value(v, '.1f')} {mode}" for mode, v in row["score"].items()) or "-"
        cells.append([row["dtype"]] + [format_value(row["decode_tok_s"].get(c), ".1f") for c in concurrency]
                     + [format_value(row["prefill_ms"], ".1f"), format_value(row["prefill_tok_s"], ".0f"),
                        score, gate_text(row["gate"])])
    device = summary.get("device") or {}
    lines = [f"kvloom accelerator benchmark: {summary['shape']} shape, random weights, "
             f"{format_value(summary.get('num_parameters') and summary['num_parameters'] / 1e6, '.1f')}M "
             f"params, on {device.get('platform', '?')} ({', '.join(device.get('devices', [])) or '?'})"]
    lines += format_table(cells)
    for phase in summary["phases"]:
        if phase["rc"] != 0:
            lines.append(f"{phase['benchmark']} {phase['dtype']}: exit status {phase['rc']} "
                         f"({'no report' if not phase['report'] else 'report written'}); see accel_bench.log")
    lines.append(f"result: {summary['result']}")
    return lines


def overall(phases: Sequence[dict], rows: Sequence[dict]) -> tuple[str, int]:
    """(result text, exit status): a phase without a report is an error; else the gate decides."""
    missing = [f"{p['benchmark']} {p['dtype']}" for p in phases if not p["report"]]
    if missing:
        return f"ERROR ({', '.join(missing)} failed)", 2
    failed = [r["dtype"] for r in rows if r["gate"] is not None and not r["gate"]["passed"]]
    if failed:
        return f"FAIL (scoring gate, {', '.join(failed)})", 1
    return "PASS", 0


# ---- running ------------------------------------------------------------------------------------

def _log(message: str) -> None:
    log("accel_bench", message)


def ensure_checkpoint(path: str, shape: str, seed: int) -> str:
    """The checkpoint at `path`, built unless a complete build of the same shape and seed is there."""
    stamp_path = os.path.join(path, "kvloom-random-checkpoint.json")
    stamp = dict(shape=shape, config=SHAPES[shape][1], seed=seed)
    try:
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                _log(f"reusing the {shape} checkpoint in {path}")
                return path
    except (OSError, ValueError):
        pass
    _log(f"building the {shape} checkpoint (random weights) in {path}")
    t0 = time.perf_counter()
    build_shape(path, shape, seed)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)  # last: a build cut short is built again
    _log(f"built in {time.perf_counter() - t0:.1f} s")
    return path


def run_phase(argv: list[str], log_file, timeout_s: float) -> int:
    """One benchmark process, its output appended to log_file; its exit status (-9: timed out)."""
    log_file.write(f"\n$ {' '.join(argv[1:])}\n")
    log_file.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                              check=False).returncode
    except subprocess.TimeoutExpired:
        log_file.write(f"\n(timed out after {timeout_s:g} s)\n")
        return -9


def read_report(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def default_checkpoint_dir(shape: str, seed: int) -> str:
    from kvloom.engine.config import cache_root

    return os.path.join(cache_root(), "random-checkpoints", f"{shape}-seed{seed}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer shape and small workloads (a CPU check)")
    p.add_argument("--dtypes", type=comma_choices(DTYPES, "--dtypes"), default=DTYPES,
                   help="comma-separated (default bfloat16,float32)")
    p.add_argument("--benchmarks", type=comma_choices(tuple(BENCHMARKS), "--benchmarks"),
                   default=tuple(BENCHMARKS), help="comma-separated from engine,score (default both)")
    p.add_argument("--score-modes", default="packed",
                   help="scoring modes, comma-separated from single,batched,packed (default packed, the "
                        "engine's default); the gate holds for each")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="output directory (default: $OUT, else a fresh temporary directory)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory, built there when missing "
                   "(default: a cache directory per shape and seed, e.g. ~/.cache/kvloom/random-checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds each benchmark process may run (default 1200, --tiny 600)")
    p.add_argument("--compile-cache", default=None, help="passed to each benchmark (default: theirs)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.dtypes or not args.benchmarks:
        raise SystemExit("accel_bench: --dtypes and --benchmarks need at least one name each")
    plan = TINY if args.tiny else FULL
    out_dir = args.out or tempfile.mkdtemp(prefix="kvloom-accel-")
    os.makedirs(out_dir, exist_ok=True)
    checkpoint = ensure_checkpoint(args.checkpoint or default_checkpoint_dir(plan.shape, args.seed),
                                   plan.shape, args.seed)
    extra = ["--compile-cache", args.compile_cache] if args.compile_cache is not None else []
    score_extra = ["--modes", args.score_modes]
    timeout_s = args.timeout or plan.timeout_s

    phases, rows, device, num_parameters = [], [], None, None
    with open(os.path.join(out_dir, "accel_bench.log"), "a") as log_file:
        for dtype in args.dtypes:
            reports = {}
            for benchmark in args.benchmarks:
                path = report_path(out_dir, benchmark, dtype)
                if os.path.exists(path):
                    os.remove(path)  # a report left from an earlier run must not pass for this one's
                _log(f"{dtype} {benchmark}: running")
                t0 = time.perf_counter()
                argv = phase_argv(plan, benchmark, checkpoint, dtype, path,
                                  extra + (score_extra if benchmark == "score" else []))
                rc = run_phase(argv, log_file, timeout_s)
                reports[benchmark] = read_report(path)
                phases.append(dict(benchmark=benchmark, dtype=dtype, rc=rc, wall_s=time.perf_counter() - t0,
                                   report=os.path.basename(path) if reports[benchmark] else None))
                _log(f"{dtype} {benchmark}: exit status {rc} in {phases[-1]['wall_s']:.1f} s")
            rows.append(summary_row(plan, dtype, reports.get("engine"), reports.get("score")))
            for report in filter(None, reports.values()):
                device, num_parameters = report["parallel"], report["num_parameters"]

    result, status = overall(phases, rows)
    summary = dict(shape=plan.shape, checkpoint=checkpoint, out_dir=out_dir, min_items_per_s=MIN_ITEMS_PER_S,
                   concurrency=list(plan.concurrency), prefill_tokens=plan.prefill_tokens, device=device,
                   num_parameters=num_parameters, rows=rows, phases=phases, result=result)
    lines = summary_lines(summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    _log(f"wrote {out_dir}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
