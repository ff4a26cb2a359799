"""The `kvloom` command line: builds the parser and runs the chosen command.

The parser is built from flag declarations only (tools.engine_args for the engine's flags,
tools.command_args for the measuring commands'); each command function imports what it runs when
it runs, so `kvloom serve` loads the server and the engine, never a benchmark module.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from kvloom.engine.config import CacheConfig

from kvloom.tools.command_args import (add_bench_args, add_build_llama_server_args, add_compare_args,
                                       add_fault_args, add_router_args, add_soak_args)
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, report_config_errors, use_compile_cache)
from kvloom.tools.flag_file import FlagFileError, expand_config_argv
from kvloom.tools.serve_args import API_KEY_ENV, add_serve_args
from kvloom.tools.tune_args import add_tune_args

CHAT_MAX_MODEL_LEN = 2048  # kvloom chat without --max-model-len (clipped to the model's own limit)


def cmd_chat(args) -> int:
    """One greedy answer through the Engine (the serving path), warm-up skipped: only the two step
    shapes this prompt needs are compiled. One sequence: max_running 1, KV pages for one max_model_len."""
    import asyncio

    from kvloom.engine.engine import Engine
    from kvloom.engine.request import SamplingParams

    use_compile_cache(args.compile_cache)
    max_model_len = args.max_model_len or CHAT_MAX_MODEL_LEN
    one_sequence = -(-max_model_len // (args.page_size or CacheConfig().page_size)) + 1  # page 0 is reserved
    config = engine_config_from_args(args, max_running=1, max_model_len=max_model_len,
                                     num_pages=one_sequence).replace(warmup=False)

    async def answer() -> int:
        t0 = time.perf_counter()
        async with Engine(config) as engine:
            if not engine.is_ready:
                print(f"kvloom: {engine.state_detail}", file=sys.stderr)
                return 1
            print(f"kvloom: loaded {engine.model_name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
            messages = [{"role": "user", "content": args.prompt}]
            async for out in engine.generate(messages=messages, params=params):
                if out.error:
                    print(f"\nkvloom: {out.error}", file=sys.stderr)
                    return 1
                print(out.text, end="", flush=True)
        print()
        return 0

    return asyncio.run(answer())


def quiet_logging(level: str) -> None:
    """kvloom's own lines at `level`; libraries at WARNING, and no advice about frameworks or accelerators
    kvloom does not use (transformers without PyTorch, JAX probing for TPUs)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvloom").setLevel(level.upper())


def cmd_serve(args) -> int:
    quiet_logging(args.log_level)
    import uvloop

    from kvloom.api.server import serve
    from kvloom.engine import distributed
    from kvloom.engine.engine import Engine
    from kvloom.engine.faults import FaultInjector

    config = engine_config_from_args(args, serve=True)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    parallel, channel, runner_args = config.parallel, None, {}
    if parallel.is_multiprocess:
        distributed.initialize(parallel)  # before any other JAX use
    use_compile_cache(args.compile_cache)
    if parallel.process_id > 0:
        return distributed.follow(config)
    if parallel.is_multiprocess:
        channel = distributed.LeaderChannel(parallel)
        runner_args = dict(runner_factory=distributed.leader_runner_factory(channel))

    faults = FaultInjector() if args.enable_fault_injection or args.fault_at_start else None
    if args.fault_at_start:
        try:
            faults.arm(args.fault_at_start)
        except ValueError as exc:
            print(f"kvloom serve: error: --fault-at-start: {exc}", file=sys.stderr)
            return 2

    async def main():
        engine = Engine(config, faults=faults, **runner_args)
        await serve(engine, args.host, args.port, drain_timeout=args.drain_timeout,
                    enable_admin=args.enable_admin or faults is not None, api_key=api_key,
                    access_log=not args.no_access_log, command_started=getattr(args, "command_started", None))

    try:
        uvloop.run(main())
    finally:
        if channel is not None:
            channel.close()
    return 0


def cmd_bench(args) -> int:
    from kvloom.tools.bench import main_from_args

    return main_from_args(args)


def cmd_compare(args) -> int:
    from kvloom.tools.compare import main_from_args

    return main_from_args(args)


def cmd_build_llama_server(args) -> int:
    from kvloom.tools.llama_server import main_from_args

    return main_from_args(args)


def cmd_soak(args) -> int:
    from kvloom.tools.soak import main_from_args

    return main_from_args(args)


def cmd_faults(args) -> int:
    from kvloom.tools.fault_gate import main_from_args

    return main_from_args(args)


def cmd_tune(args) -> int:
    from kvloom.tools.tune import main_from_args

    return main_from_args(args)


def cmd_router(args) -> int:
    from kvloom.tools.router_cli import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one chat prompt greedily from the command line")
    add_model_args(chat)
    chat.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    chat.add_argument("--max-tokens", type=int, default=48)
    add_engine_args(chat, defaults_shown={"--max-running": 1, "--max-model-len": CHAT_MAX_MODEL_LEN,
                                          "--num-pages": "one sequence of --max-model-len"})
    add_compile_cache_arg(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible)")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    commands = (
        ("bench", "load-test an OpenAI-compatible server: latency, throughput, SLOs", add_bench_args,
         cmd_bench),
        ("compare", "kvloom beside transformers, llama.cpp and the roofline", add_compare_args, cmd_compare),
        ("build-llama-server", "build llama.cpp's llama-server once (minutes), the serving peer of compare",
         add_build_llama_server_args, cmd_build_llama_server),
        ("soak", "a long mixed chat and score workload: errors and latency over time", add_soak_args,
         cmd_soak),
        ("faults", "fault-handling release gate against a --enable-fault-injection server", add_fault_args,
         cmd_faults),
        ("router", "route requests across kvloom replicas by cached prefix and load", add_router_args,
         cmd_router),
        ("tune", "find the best serving configuration under latency SLOs (Optuna)", add_tune_args, cmd_tune),
    )
    for name, help_text, add_args, func in commands:
        command = sub.add_parser(name, help=help_text)
        add_args(command)
        command.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    started = time.monotonic()
    try:  # `kvloom serve --config FILE`: the file's flags, then the command line's (which win)
        argv = expand_config_argv(sys.argv[1:] if argv is None else argv)
    except FlagFileError as exc:
        print(f"kvloom serve: error: --config {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.command_started = started
    return report_config_errors(f"kvloom {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
