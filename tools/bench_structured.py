"""Cost per token of a structured output (response_format json_schema) beside unconstrained requests,
on one engine in process.

    .venv/bin/python -m kvloom.tools.bench_structured [--model PATH] [--concurrency 1,8] [--max-tokens 96]
        [--repeats 3] [--json OUT.json]

Per concurrency C, greedy runs of one chat prompt, each `repeats` times:
  plain        C unconstrained requests (ignore_eos: exactly max_tokens each)
  json_schema  C requests constrained to SCHEMA (each ends when its JSON is complete)
  mixed        C/2 of each, sharing steps (C >= 2)
The figure is each request's time per output token once decoding, (last output - first output) /
(tokens - 1), median over the requests of a kind. Then the two parts of that cost apart: the grammar's
host work on the event loop (compiling the schema, a fresh one each time past the compiled cache, and
bitmask() + accept() per token, replayed over the constrained outputs), and the jitted sampler on
random logits of the model's vocabulary with and without a bitmask. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from kvloom.tools.command_args import parse_int_list
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, report_config_errors,
                                      use_compile_cache)
from kvloom.tools.report import format_table, publish, ratio

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a fictional person as JSON with a name, an age, a role "
                                        "(admin, user or guest) and a few tags."}]


def _log(message: str) -> None:
    print(f"[bench_structured] {message}", file=sys.stderr, flush=True)


def per_token_s(times: list[float]) -> float | None:
    """Seconds per token once decoding, from the arrival time of each output token."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


async def run_one(engine, params) -> dict:
    times, ids, finish = [], [], None
    async for out in engine.generate(messages=MESSAGES, params=params):
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        now = time.perf_counter()
        times += [now] * len(out.token_ids)
        ids += out.token_ids
        finish = out.finish_reason
    return dict(per_token_s=per_token_s(times), token_ids=ids, finish_reason=finish.value)


async def run_mix(engine, num_plain: int, num_constrained: int, max_tokens: int) -> dict:
    from kvloom.engine.request import ResponseFormat, SamplingParams

    plain = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                 response_format=ResponseFormat.json_schema(SCHEMA))
    jobs = [run_one(engine, constrained) for _ in range(num_constrained)] + \
           [run_one(engine, plain) for _ in range(num_plain)]
    results = await asyncio.gather(*jobs)
    return dict(constrained=results[:num_constrained], plain=results[num_constrained:])


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def grammar_host_cost(engine, outputs: list[list[int]], repeats: int) -> dict:
    """Compile time of a fresh schema, and bitmask() + accept() per token over the given outputs."""
    from kvloom.engine.request import ResponseFormat

    compiles = []
    for i in range(repeats):
        fresh = ResponseFormat.json_schema(dict(SCHEMA, title=f"bench-{i}-{time.time_ns()}"))
        t0 = time.perf_counter()
        engine.grammars.matcher(fresh)
        compiles.append(time.perf_counter() - t0)
    per_token, num_tokens = [], 0
    for ids in outputs:
        matcher = engine.grammars.matcher(ResponseFormat.json_schema(SCHEMA))
        t0 = time.perf_counter()
        for token in ids:
            matcher.bitmask()
            matcher.accept(token)
        per_token.append((time.perf_counter() - t0) / max(1, len(ids)))
        num_tokens += len(ids)
    return dict(compile_s=_median(compiles), mask_and_accept_s=_median(per_token), num_tokens=num_tokens)


def sampler_cost(runner, num_rows: int, repeats: int) -> dict:
    """Seconds per call of the runner's jitted sampler on [num_rows, V] logits, greedy and sampled, with
    every row constrained (a bitmask allowing half the vocabulary) and with none. The rows are built by the
    runner itself, so the sampler sees exactly the arrays of a serving step."""
    import dataclasses

    import jax
    import numpy as np

    from kvloom.engine.batch import ScheduledRow
    from kvloom.engine.request import SamplingParams

    rng = np.random.default_rng(0)
    logits = jax.device_put(rng.standard_normal((num_rows, runner.vocab_size)).astype(np.float32))
    half = rng.integers(0, 2**31, size=runner.bitmask_words, dtype=np.int64).astype(np.int32)
    out = {}
    for temperature in (0.0, 1.0):
        for constrained in (False, True):
            row = ScheduledRow("bench", 0, (1,), 0, (1,), True, SamplingParams(temperature=temperature), 0, 0,
                               token_bitmask=half if constrained else None)
            inp = runner._sampling_input(num_rows, [(i, dataclasses.replace(row)) for i in range(num_rows)])
            jax.block_until_ready(runner._sample(logits, inp))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(runner._sample(logits, inp))
                times.append(time.perf_counter() - t0)
            out[f"{'sampled' if temperature else 'greedy'}_{'bitmask' if constrained else 'plain'}_s"] = \
                statistics.median(times)
    return dict(num_rows=num_rows, **out)


async def bench(config, args) -> dict:
    from kvloom.engine.engine import Engine

    _log("starting the engine (compiles every step shape; about a minute cold)")
    async with Engine(config) as engine:
        if not engine.is_ready:
            raise RuntimeError(f"the engine is not ready: {engine.state_detail}")
        await run_mix(engine, 1, 1, 4)  # the first constrained request: the schema compiles here
        levels, outputs = [], []
        for c in args.concurrency:
            kinds = {"plain": (c, 0), "json_schema": (0, c)}
            if c >= 2:
                kinds["mixed"] = (c - c // 2, c // 2)
            level = dict(concurrency=c)
            for kind, (num_plain, num_constrained) in kinds.items():
                runs = [await run_mix(engine, num_plain, num_constrained, args.max_tokens)
                        for _ in range(args.repeats)]
                constrained = [r for run in runs for r in run["constrained"]]
                plain = [r for run in runs for r in run["plain"]]
                outputs += [r["token_ids"] for r in constrained]
                level[kind] = dict(
                    plain_per_token_s=_median(r["per_token_s"] for r in plain),
                    constrained_per_token_s=_median(r["per_token_s"] for r in constrained),
                    constrained_tokens=_median(len(r["token_ids"]) for r in constrained),
                    constrained_finish=sorted({r["finish_reason"] for r in constrained}))
                _log(f"@{c} {kind}: {level[kind]}")
            levels.append(level)
        example = engine.tokenizer.decode(outputs[-1]) if outputs else None
        host = grammar_host_cost(engine, outputs, args.repeats)
        runner = engine.runner
        sampler = sampler_cost(runner, max(args.concurrency), 5 * args.repeats)  # nothing else is running
        return dict(model=engine.model_name, vocab_size=runner.vocab_size, max_tokens=args.max_tokens,
                    levels=levels, grammar=host, sampler=sampler, example_output=example, schema=SCHEMA)


def print_report(report: dict, file=None) -> None:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"  # noqa: E731
    cells = [("concurrency", "kind", "plain ms/token", "json_schema ms/token", "ratio")]
    for level in report["levels"]:
        for kind in ("plain", "json_schema", "mixed"):
            if kind in level:
                row = level[kind]
                base = level["plain"]["plain_per_token_s"]
                cells.append((str(level["concurrency"]), kind, ms(row["plain_per_token_s"]),
                              ms(row["constrained_per_token_s"]),
                              "-" if row["constrained_per_token_s"] is None else
                              f"{ratio(row['constrained_per_token_s'], base):.2f}x"))
    print(f"model {report['model']} (vocabulary {report['vocab_size']}), greedy, max_tokens "
          f"{report['max_tokens']}", file=file)
    for line in format_table(cells, num_left=2):
        print(line, file=file)
    g = report["grammar"]
    print(f"grammar host work: compile {ms(g['compile_s'])} ms per schema; bitmask + accept "
          f"{g['mask_and_accept_s'] * 1e6:.1f} us per token (median over {g['num_tokens']} tokens)",
          file=file)
    s = report["sampler"]
    print(f"jitted sampler, {s['num_rows']} rows: greedy {ms(s['greedy_plain_s'])} ms, with bitmasks "
          f"{ms(s['greedy_bitmask_s'])} ms; sampled {ms(s['sampled_plain_s'])} ms, with bitmasks "
          f"{ms(s['sampled_bitmask_s'])} ms", file=file)
    print(f"example output: {report['example_output']}", file=file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, with_dtype=False)
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 8], help="comma-separated, e.g. 1,8")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind at each concurrency")
    p.add_argument("--json", default=None, help="write every figure to this file")
    add_compile_cache_arg(p)
    add_engine_args(p, defaults_shown={"--max-running": "the highest concurrency"})
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_tokens <= 1 or args.repeats <= 0:
        raise SystemExit("--max-tokens must be > 1 and --repeats positive")
    use_compile_cache(args.compile_cache)
    config = engine_config_from_args(args, dtype="float32", max_running=max(args.concurrency))
    report = asyncio.run(bench(config, args))
    return publish(report, print_report, args.json, "bench_structured")


if __name__ == "__main__":
    report_config_errors("python -m kvloom.tools.bench_structured", main)
