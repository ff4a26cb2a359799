"""The `kvloom` command line: builds the parser and runs the chosen command.

The parser is built from flag declarations only (tools.engine_args for the engine's flags,
tools.command_args for the measuring commands'); each command function imports what it runs when
it runs, so `kvloom serve` loads the server and the engine, never a benchmark module.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kvloom.tools.command_args import add_bench_args, add_compare_args, add_fault_args, add_soak_args
from kvloom.tools.engine_args import (add_compile_cache_arg, add_engine_args, add_model_args,
                                      engine_config_from_args, use_compile_cache)


def cmd_chat(args) -> int:
    from kvloom.engine.models import llama
    from kvloom.engine.models.loader import load_model
    from kvloom.engine.offline import greedy_generate
    from kvloom.engine.sharding import make_mesh
    from kvloom.engine.tokenizer import Tokenizer

    t0 = time.perf_counter()
    source, cfg, params = load_model(args.model, args.dtype)
    mesh = make_mesh(args.tensor_parallel_size)
    params = llama.shard_params(params, cfg, mesh)
    tokenizer = Tokenizer.load(source, extra_eos_ids=cfg.eos_token_ids)
    print(f"kvloom: loaded {source.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    out = greedy_generate(cfg, params, [prompt_ids], args.max_tokens, stop_ids=tokenizer.eos_token_ids,
                          mesh=mesh)[0]
    print(tokenizer.decode(out))
    return 0


def cmd_serve(args) -> int:
    import uvloop

    from kvloom.api.server import serve
    from kvloom.engine import distributed
    from kvloom.engine.engine import Engine
    from kvloom.engine.faults import FaultInjector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args, serve=True)
    parallel, channel, runner_args = config.parallel, None, {}
    if parallel.is_multiprocess:
        distributed.initialize(parallel)  # before any other JAX use
    use_compile_cache(args.compile_cache)
    if parallel.process_id > 0:
        return distributed.follow(config)
    if parallel.is_multiprocess:
        channel = distributed.LeaderChannel(parallel)
        runner_args = dict(runner_factory=distributed.leader_runner_factory(channel))

    async def main():
        faults = FaultInjector() if args.enable_fault_injection else None
        engine = Engine(config, faults=faults, **runner_args)
        await serve(engine, args.host, args.port, drain_timeout=args.drain_timeout,
                    enable_admin=args.enable_admin or args.enable_fault_injection)

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


def cmd_soak(args) -> int:
    from kvloom.tools.soak import main_from_args

    return main_from_args(args)


def cmd_faults(args) -> int:
    from kvloom.tools.fault_gate import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one chat prompt greedily from the command line")
    add_model_args(chat)
    chat.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    chat.add_argument("--max-tokens", type=int, default=48)
    chat.add_argument("--tensor-parallel-size", type=int, default=1, help="devices to split the model over")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible)")
    add_model_args(serve)
    add_engine_args(serve, serve=True)
    add_compile_cache_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    serve.add_argument("--enable-admin", action="store_true", help="POST /admin/restart (and /admin/faults)")
    serve.add_argument("--enable-fault-injection", action="store_true",
                       help="arm faults through POST /admin/faults (tests and the fault tool)")
    serve.set_defaults(func=cmd_serve)

    commands = (
        ("bench", "load-test an OpenAI-compatible server: latency, throughput, SLOs", add_bench_args, cmd_bench),
        ("compare", "kvloom beside transformers, llama.cpp and the roofline", add_compare_args, cmd_compare),
        ("soak", "a long mixed chat and score workload: errors and latency over time", add_soak_args, cmd_soak),
        ("faults", "fault-handling release gate against a --enable-fault-injection server", add_fault_args,
         cmd_faults),
    )
    for name, help_text, add_args, func in commands:
        command = sub.add_parser(name, help=help_text)
        add_args(command)
        command.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
