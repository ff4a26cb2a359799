"""Where one engine step's time goes, measured from a real `jax.profiler` trace.

    .venv/bin/python -m kvloom.tools.profile_step [--model PATH] [--batches 1,8,32] [--prefill-tokens 512]
        [--score-items 0 --score-query-tokens 2000 --score-item-tokens 20]
        [--steps 16] [--dtype float32] [--keep-trace DIR] [--json OUT.json]

Data flow:
  one Engine (started once; its chunk size and step budget raised so a prefill of --prefill-tokens is
  one step), its runner wrapped to record the shape of every step it runs
  per scenario: decode with B requests (greedy, never ending early; traced once all B decode), then
      a prefill (fresh prompts of --prefill-tokens, one at a time, max_tokens 1)
      a score request with --score-items items (when asked; the engine's scoring mode, packed by default),
      its query scored once before so that the traced steps are score steps, as with a cached query
      jax.profiler.trace over --steps steps -> perfetto JSON
  trace -> XLA op events (module, op, thread, start, duration; nested ops counted once, exclusive)
        + host spans (engine.spans: schedule, inputs, dispatch, results, apply)
  the runner's optimized HLO for the recorded shapes (ModelRunner.compiled_hlo) -> each op's named
      scope (engine.models.llama, kernels.attention) and whether it is a matmul
  -> per step: device time by part (the projections and MLP with their norms, LM head, attention with its
     page gathers, KV cache write, sampling, weight slicing, the rest), host time the device sits idle
     (schedule, batch building, dispatch and transfers, apply, the rest), each in ms and % of the step

Nothing is estimated: every figure is a sum of trace events divided by the steps traced. The trace
covers whole steps, from one `schedule` span to the one --steps later.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Optional

import numpy as np

from kvloom.engine import spans
from kvloom.tools.command_args import parse_int_list
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, report_config_errors,
                                      use_compile_cache)
from kvloom.tools.report import log, write_json
from kvloom.tools.workload import prompt_id_range, random_prompts

DEVICE_PARTS = ("q/k/v projection (+ norm, rope)", "output projection", "MLP (+ norm, activation)",
                "LM head", "attention (incl. page gathers)", "KV cache write", "sampling",
                "matmuls XLA left unnamed", "layer weight slicing", "other device ops")
HOST_PARTS = ("schedule (event loop)", "batch -> arrays (compute thread)", "dispatch + input transfer",
              "results: sync + copy back", "apply + emit (event loop)", "other host time")
_SPAN_PART = {spans.SCHEDULE: HOST_PARTS[0], spans.INPUTS: HOST_PARTS[1], spans.DISPATCH: HOST_PARTS[2],
              spans.RESULTS: HOST_PARTS[3], spans.APPLY: HOST_PARTS[4]}
_SCOPES = (("qkv_proj", DEVICE_PARTS[0]), ("o_proj", DEVICE_PARTS[1]), ("mlp", DEVICE_PARTS[2]),
           ("lm_head", DEVICE_PARTS[3]), ("attention", DEVICE_PARTS[4]), ("kv_write", DEVICE_PARTS[5]))


def _log(message: str) -> None:
    log("profile_step", message)


# ---- the optimized HLO: op -> (scope, is a matmul) ----------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class OpInfo:
    op_name: str  # the metadata's op_name: jit(...)/<named scopes>/<primitive>
    opcode: str
    is_matmul: bool


def _inherit_names(names: dict[str, str], operands: dict[str, list[str]]) -> dict[str, str]:
    """An op XLA left without metadata (its library fusions of the attention's products, matrix-vector
    products at batch 1) takes the named scope of the nearest op it reads from that has one."""
    resolved = dict(names)
    for name, op_name in names.items():
        if op_name:
            continue
        seen, frontier = {name}, list(operands.get(name, ()))
        while frontier and not resolved[name]:
            following = []
            for operand in frontier:
                if operand in seen or operand not in names:
                    continue
                seen.add(operand)
                if names[operand] and any(f"/{tag}/" in names[operand] for tag, _ in _SCOPES):
                    resolved[name] = names[operand]
                    break
                following += operands.get(operand, ())
            frontier = following
    return resolved


def parse_hlo(text: str) -> tuple[str, dict[str, OpInfo]]:
    """(module name, {instruction name: OpInfo}) of one optimized HLO module's text. A fusion is a
    matmul when the computation it calls holds a dot or a convolution (or it is a library matmul). An op
    without metadata is named after its inputs (`_inherit_names`)."""
    module = text.split(None, 2)[1].rstrip(",")
    calls, opcodes, names, operands = {}, {}, {}, {}
    has_dot: dict[str, bool] = collections.defaultdict(bool)
    computation = None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and "=" not in line.split("{")[0]:
            computation = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode, rest = m.groups()
        opcodes[name] = opcode
        if opcode in ("dot", "convolution") and computation:
            has_dot[computation] = True
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if called:
            calls[name] = called.group(1)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        names[name] = op_name.group(1) if op_name else ""
        operands[name] = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    library = ("__onednn", "__ynn", "xnn", "matmul", "dot")
    names = _inherit_names(names, operands)
    ops = {}
    for name, opcode in opcodes.items():
        is_matmul = opcode in ("dot", "convolution") or has_dot.get(calls.get(name, ""), False)
        if opcode == "custom-call" and any(tag in name for tag in library):
            is_matmul = True
        ops[name] = OpInfo(names[name], opcode, is_matmul)
    return module, ops


def device_part(module: str, op: str, info: Optional[OpInfo]) -> str:
    """The DEVICE_PARTS entry of one executed op: by its module (the sampler), else by the named scope
    the model put it in (the scope, not the opcode: a scope holds its norms and activations too), else
    a matmul XLA rewrote without its scope (matrix-vector products at batch 1), else dynamic slices, else
    other."""
    if "sample" in module:
        return "sampling"
    scope = info.op_name if info is not None else ""
    part = next((part for tag, part in _SCOPES if f"/{tag}/" in scope), None)
    if part is not None:
        return part
    if info is not None and info.is_matmul:  # e.g. matrix-vector products at batch 1 lose their metadata
        return "matmuls XLA left unnamed"
    if "dynamic-slice" in op or (info is not None and info.opcode == "dynamic-slice"):
        return "layer weight slicing"
    return "other device ops"


# ---- the trace ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
    name: str
    thread: int
    start: float  # microseconds
    dur: float
    module: str = ""  # XLA ops only
    exclusive: float = 0.0


def load_trace(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise RuntimeError(f"no perfetto trace under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def split_events(raw: list[dict]) -> tuple[list[Event], list[Event]]:
    """(XLA op events with exclusive durations, host span events) of a perfetto trace."""
    ops, host = [], []
    for e in raw:
        if e.get("ph") != "X":
            continue
        args = e.get("args") or {}
        if "hlo_op" in args and not e["name"].startswith("end:"):
            module = args.get("hlo_module", "")
            ops.append(Event(args["hlo_op"], e["tid"], float(e["ts"]), float(e["dur"]), module))
        elif e["name"] in _SPAN_PART:
            host.append(Event(e["name"], e["tid"], float(e["ts"]), float(e["dur"])))
    by_thread = collections.defaultdict(list)
    for op in ops:
        by_thread[op.thread].append(op)
    for thread_ops in by_thread.values():  # a while op encloses its body's ops: count each microsecond once
        thread_ops.sort(key=lambda ev: (ev.start, -ev.dur))
        stack: list[Event] = []
        for op in thread_ops:
            op.exclusive = op.dur
            while stack and stack[-1].start + stack[-1].dur <= op.start:
                stack.pop()
            if stack:
                stack[-1].exclusive -= op.dur
            stack.append(op)
    return ops, host


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _outside(start: float, end: float, busy: list[tuple[float, float]]) -> float:
    """Microseconds of [start, end) not covered by the (sorted, disjoint) busy intervals."""
    covered = 0.0
    i = max(0, bisect.bisect_left(busy, (start, start)) - 1)
    while i < len(busy) and busy[i][0] < end:
        a, b = max(busy[i][0], start), min(busy[i][1], end)
        covered += max(0.0, b - a)
        i += 1
    return (end - start) - covered


def breakdown(ops: list[Event], host: list[Event], hlo: dict[str, dict[str, OpInfo]], num_steps: int) -> dict:
    """Per step, over the window from the first `schedule` span to the one num_steps later."""
    schedules = sorted(e.start for e in host if e.name == spans.SCHEDULE)
    if len(schedules) < 2:
        raise RuntimeError("the trace holds fewer than two steps")
    num_steps = min(num_steps, len(schedules) - 1)
    t0, t1 = schedules[0], schedules[num_steps]
    inside = [op for op in ops if t0 <= op.start < t1]
    device, dots = collections.Counter(), 0.0
    for op in inside:
        info = hlo.get(op.module, {}).get(op.name)
        device[device_part(op.module, op.name, info)] += op.exclusive
        dots += op.exclusive if info is not None and info.is_matmul else 0.0
    busy = _union([(op.start, op.start + op.dur) for op in inside])
    idle_total = _outside(t0, t1, busy)
    host_idle = collections.Counter()
    for e in host:
        if t0 <= e.start < t1:
            host_idle[_SPAN_PART[e.name]] += _outside(e.start, min(e.start + e.dur, t1), busy)
    host_idle[HOST_PARTS[-1]] = max(0.0, idle_total - sum(host_idle.values()))
    wall = t1 - t0
    to_ms = lambda us: us / 1e3 / num_steps  # noqa: E731
    return dict(num_steps=num_steps, step_ms=to_ms(wall), device_busy_ms=to_ms(wall - idle_total),
                dot_ops_ms=to_ms(dots),
                device={part: to_ms(device[part]) for part in DEVICE_PARTS},
                host_idle={part: to_ms(host_idle[part]) for part in HOST_PARTS})


def report_lines(name: str, result: dict) -> list[str]:
    step = result["step_ms"]
    pct = lambda ms: f"{100 * ms / step:5.1f}%" if step else "-"  # noqa: E731
    lines = [f"{name}: {step:.2f} ms per step over {result['num_steps']} steps "
             f"({', '.join(result['shapes'])}); device busy {result['device_busy_ms']:.2f} ms "
             f"({pct(result['device_busy_ms']).strip()}), of which dot ops {result['dot_ops_ms']:.2f} ms"]
    lines.append("  device (XLA ops, exclusive time)")
    lines += [f"    {part:<34}{ms:9.2f} ms  {pct(ms)}" for part, ms in result["device"].items()]
    lines.append("  host, while no XLA op runs")
    lines += [f"    {part:<34}{ms:9.2f} ms  {pct(ms)}" for part, ms in result["host_idle"].items()]
    return lines


# ---- the engine under trace ---------------------------------------------------------------------

def _recording_factory(shapes: list):
    def make(config, plan):
        from kvloom.engine.runner import ModelRunner

        class RecordingRunner(ModelRunner):
            def launch(self, batch, prev=None):  # every step, one ahead (--overlap-schedule on) or not
                shapes.append(batch.shape)
                return super().launch(batch, prev)

        return RecordingRunner(config, plan)
    return make


class _Streams:
    """Consumes request streams; wakes a waiter once a token count is reached."""

    def __init__(self):
        self.tokens = 0
        self.counts: dict[str, int] = {}
        self._waiters: list[tuple[int, asyncio.Future]] = []

    async def consume(self, stream) -> None:
        async for out in stream:
            if out.error and out.finish_reason != "abort":
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            self.counts[out.request_id] = self.counts.get(out.request_id, 0) + len(out.token_ids)
            self.tokens += len(out.token_ids)
            for target, future in list(self._waiters):
                if self.tokens >= target and not future.done():
                    future.set_result(None)

    async def reach(self, tokens: int) -> None:
        if self.tokens >= tokens:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((tokens, future))
        await future


class Tracer:
    """Traces one awaitable into a directory; keeps the shapes of the steps that ran meanwhile."""

    def __init__(self, shapes: list, trace_dir: str):
        self.shapes, self.trace_dir, self.ran = shapes, trace_dir, collections.Counter()

    async def __call__(self, run) -> None:
        import jax

        first = len(self.shapes)
        jax.profiler.start_trace(self.trace_dir, create_perfetto_trace=True)
        try:
            await run()
        finally:
            await asyncio.to_thread(jax.profiler.stop_trace)
            self.ran = collections.Counter(self.shapes[first:])


async def profile_decode(engine, batch: int, steps: int, rng, trace: Tracer) -> None:
    from kvloom.engine.request import SamplingParams

    prompts = random_prompts(rng, batch, 32, prompt_id_range(engine.runner.vocab_size))
    params = SamplingParams(max_tokens=engine.max_model_len - 64, temperature=0.0, ignore_eos=True)
    ids = [f"profile-{batch}-{i}" for i in range(batch)]
    streams = _Streams()
    tasks = [asyncio.ensure_future(streams.consume(engine.generate(p, params, request_id=rid)))
             for p, rid in zip(prompts, ids)]
    try:
        await streams.reach(4 * batch)  # every request decoding (the first tokens come with prefill)
        start = streams.tokens
        await trace(lambda: streams.reach(start + batch * (steps + 2)))
    finally:
        for rid in ids:
            engine.abort(rid)
        await asyncio.gather(*tasks, return_exceptions=True)


async def profile_prefill(engine, num_tokens: int, steps: int, rng, trace: Tracer) -> None:
    from kvloom.engine.request import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    id_range = prompt_id_range(engine.runner.vocab_size)

    async def run():
        for prompt in random_prompts(rng, steps + 2, num_tokens, id_range):  # fresh: nothing cached
            await _Streams().consume(engine.generate(prompt, params))

    await trace(run)


async def profile_score(engine, query_tokens: int, num_items: int, item_tokens: int, rng,
                        trace: Tracer) -> None:
    id_range = prompt_id_range(engine.runner.vocab_size)
    query = random_prompts(rng, 1, query_tokens, id_range)[0]
    items = random_prompts(rng, num_items, item_tokens, id_range)
    labels = [query[0], query[1]]
    await engine.score(query, items[:1], labels)  # the query computed and cached before the trace
    out = None

    async def run():
        nonlocal out
        out = await engine.score(query, items, labels)

    await trace(run)
    if len(out.scores) != num_items:
        raise RuntimeError(f"score: {len(out.scores)} scores for {num_items} items")


async def profile(args) -> dict:
    from kvloom.engine.engine import Engine

    chunk = max(args.prefill_tokens, 256)
    config = engine_config_from_args(args, max_running=max(args.batches), chunk_size=chunk,
                                     max_tokens_per_step=chunk + max(args.batches))
    shapes: list = []
    rng = np.random.default_rng(args.seed)
    results = {}
    _log("starting the engine (compiles every step shape)")
    async with Engine(config, runner_factory=_recording_factory(shapes)) as engine:
        if not engine.is_ready:
            raise RuntimeError(f"the engine is not ready: {engine.state_detail}")
        scenarios = [(f"decode, batch {b}", lambda d, b=b: profile_decode(engine, b, args.steps, rng, d))
                     for b in args.batches]
        if args.prefill_tokens:
            scenarios.append((f"prefill, {args.prefill_tokens} tokens",
                              lambda d: profile_prefill(engine, args.prefill_tokens, args.steps, rng, d)))
        if args.score_items:
            scenarios.append((f"score, {args.score_items} items x {args.score_item_tokens} tokens after a "
                              f"{args.score_query_tokens}-token query",
                              lambda d: profile_score(engine, args.score_query_tokens, args.score_items,
                                                      args.score_item_tokens, rng, d)))
        for name, run in scenarios:
            trace_dir = tempfile.mkdtemp(prefix="kvloom-profile-", dir=args.keep_trace)
            _log(f"{name}: tracing {args.steps} steps into {trace_dir}")
            trace = Tracer(shapes, trace_dir)
            await run(trace)
            ran = trace.ran
            hlo = {}
            for shape in ran:
                for text in await engine._compute.run(engine.runner.compiled_hlo, shape):
                    module, ops = parse_hlo(text)
                    hlo.setdefault(module, {}).update(ops)
            ops, host = split_events(load_trace(trace_dir))
            result = breakdown(ops, host, hlo, args.steps)
            result["shapes"] = [f"{n}x (decode {s.num_decode_rows}, prefill {s.num_prefill_rows}x"
                                f"{s.prefill_len})" for s, n in ran.most_common()]
            results[name] = result
            print("\n".join(report_lines(name, result)), flush=True)
        model = engine.model_name
    return dict(model=model, dtype=config.dtype, scenarios=results)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvloom.tools.profile_step",
                                description=__doc__.split("\n")[0])
    add_model_args(p)
    add_engine_args(p)
    add_compile_cache_arg(p)
    p.add_argument("--batches", type=parse_int_list, default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prefill length (0: no prefill scenario)")
    p.add_argument("--score-items", type=int, default=0, help="items of a score scenario (0: none)")
    p.add_argument("--score-query-tokens", type=int, default=2000, help="the score scenario's query length")
    p.add_argument("--score-item-tokens", type=int, default=20, help="the score scenario's item length")
    p.add_argument("--steps", type=int, default=16, help="steps traced per scenario (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-trace", default=None, help="directory for the traces (default: a temp directory)")
    p.add_argument("--json", default=None, help="write the figures as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_compile_cache(args.compile_cache)
    result = asyncio.run(profile(args))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(report_config_errors("python -m kvloom.tools.profile_step", main))
