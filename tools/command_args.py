"""The flags of the commands that measure and gate (`kvloom bench`, `compare`, `soak`, `faults`) and of
`kvloom router`, declared apart from the code that runs them: `kvloom` builds its whole parser from this
module and tools.engine_args without importing any benchmark module, so `kvloom serve` never loads one.

Also the small option checks they share: comma-separated numbers and names, label ids, UsageError.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from kvloom.tools.engine_args import add_compile_cache_arg, add_engine_args, add_model_args

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_REQUESTS = 100  # kvloom bench, per load point, without --duration
PEERS = ("hf", "llamacpp", "llama-server")  # kvloom compare: the peers' names
LLAMA_CPP_PEERS = ("llamacpp", "llama-server")  # they take NAME:FORMAT, the GGUF they run
GGUF_FORMATS = ("f32", "f16", "original")  # the first is the default
DEFAULT_PEERS = ("hf", "llamacpp:f32", "llama-server:f32", "llama-server:f16")
LLAMA_SERVER_VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
COMPARE_WORKLOADS = ("decode", "prefill", "shared-prefix", "score")
FAULT_SCENARIOS = ("raise", "kill", "hang", "fail_request", "nan_request", "fail_warmup")  # kvloom faults
DEFAULT_FAULT_SCENARIOS = "raise,kill,hang,fail_request"


class UsageError(ValueError):
    """A bad combination of options: the command reports it on stderr and exits 2."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def number_list(text: str, kind, option: str) -> list:
    """"1,2,4" -> positive numbers of `kind`; UsageError names the option."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    require(bool(values) and all(v > 0 for v in values),
            f"{option}: expected comma-separated positive numbers, got {text!r}")
    return values


def parse_label_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--label-token-ids: expected comma-separated integers, got {text!r}") from None


def options_json(args: argparse.Namespace) -> dict:
    """The options as given, for a JSON report."""
    return {k: v for k, v in vars(args).items()
            if k not in ("func", "command") and isinstance(v, (str, int, float, bool, type(None)))}


def parse_int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def comma_choices(all_names: Sequence[str], option: str):
    """A parser of "a,b" into a tuple of known names, in order, once each ("none": no names)."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"))
        unknown = [n for n in names if n not in all_names]
        if unknown:
            raise argparse.ArgumentTypeError(f"{option}: unknown {', '.join(unknown)}; choose from "
                                             f"{', '.join(all_names)}")
        return names
    return parse


def parse_peers(text: str) -> tuple[str, ...]:
    """"hf,llama-server:f16" -> peer specs, in order, once each ("none": none); a llama.cpp peer is
    NAME:FORMAT (FORMAT from GGUF_FORMATS; a bare name means the first), the others a bare name."""
    specs = []
    for item in (i.strip() for i in text.split(",")):
        if not item or item == "none":
            continue
        name, _, gguf_format = item.partition(":")
        if name not in PEERS:
            raise argparse.ArgumentTypeError(f"--peers: unknown {name}; choose from {', '.join(PEERS)}")
        if name in LLAMA_CPP_PEERS:
            gguf_format = gguf_format or GGUF_FORMATS[0]
            if gguf_format not in GGUF_FORMATS:
                raise argparse.ArgumentTypeError(f"--peers: {item}: the format is one of "
                                                 f"{', '.join(GGUF_FORMATS)}")
        elif gguf_format:
            raise argparse.ArgumentTypeError(f"--peers: {item}: only {' and '.join(LLAMA_CPP_PEERS)} "
                                             "take :FORMAT")
        specs.append(f"{name}:{gguf_format}" if gguf_format else name)
    return tuple(dict.fromkeys(specs))


def peer_name(spec: str) -> str:
    """"llama-server" of "llama-server:f16"."""
    return spec.partition(":")[0]


def peer_format(spec: str) -> Optional[str]:
    """"f16" of "llama-server:f16"; None for a peer that runs no GGUF."""
    return spec.partition(":")[2] or None


def add_target_args(p: argparse.ArgumentParser, url_help: str, with_model: bool = True) -> None:
    target = p.add_argument_group("target")
    target.add_argument("--url", default=DEFAULT_URL, help=url_help)
    if with_model:
        target.add_argument("--model", default=None,
                            help="model name for the body (default: the first of /v1/models)")


def add_score_args(group, query_tokens: int, num_items: int, item_tokens: int,
                   label_token_ids: Optional[str]):
    """The /v1/score request shape, and --vocab-size that bounds every synthetic id."""
    group.add_argument("--query-tokens", type=int, default=query_tokens,
                       help=f"score: query tokens (default {query_tokens})")
    group.add_argument("--num-items", type=int, default=num_items,
                       help=f"score: items per request (default {num_items})")
    group.add_argument("--item-tokens", type=int, default=item_tokens,
                       help=f"score: tokens per item (default {item_tokens})")
    group.add_argument("--label-token-ids", default=label_token_ids, metavar="IDS",
                       help=f"score: label ids (default {label_token_ids})" if label_token_ids else
                       "score: label ids, e.g. 1,2 (required)")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="bound synthetic token ids (default: ids in [100, 1000))")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_target_args(p, "base URL of any OpenAI-compatible server (a trailing /v1 is fine)")

    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=["generate", "score"], default="generate")
    work.add_argument("--api", choices=["completions", "chat"], default="completions")
    work.add_argument("--prompt-format", choices=["ids", "text"], default=None,
                      help="synthetic prompts as token ids (exact lengths; default for completions) or text "
                           "of about one token per word (default for chat)")
    work.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    work.add_argument("--input-len-dist", default="fixed", metavar="DIST",
                      help="fixed | uniform[:LO:HI] | normal[:STD] | normal:MEAN:STD (default fixed)")
    work.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default 128)")
    work.add_argument("--output-len-dist", default="fixed", metavar="DIST", help="as --input-len-dist")
    work.add_argument("--shared-prefix-ratio", type=float, default=0.0,
                      help="fraction of each synthetic prompt that is a prefix common to all (default 0)")
    work.add_argument("--prompts-file", default=None, metavar="F.jsonl",
                      help='real prompts, one {"prompt": ...} or {"messages": [...]} per line, cycled')
    work.add_argument("--extra-body", default=None, metavar="JSON",
                      help="a JSON object merged into every request body, e.g. '{\"temperature\": 0}'")
    work.add_argument("--ignore-eos", action="store_true",
                      help='add "ignore_eos": true (a vLLM/kvloom extension): requests run to max_tokens')
    add_score_args(work, query_tokens=32, num_items=8, item_tokens=16, label_token_ids=None)

    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed loop with C in flight (default 1); with --request-rate, a cap on those")
    load.add_argument("--request-rate", type=float, default=None, help="open loop at R requests/s")
    load.add_argument("--arrival", choices=["poisson", "constant"], default="poisson",
                      help="inter-arrival times at --request-rate (default poisson)")
    load.add_argument("--num-requests", type=int, default=None,
                      help=f"measured requests per load point (default {DEFAULT_NUM_REQUESTS} "
                           "without --duration)")
    load.add_argument("--duration", type=float, default=None, help="stop sending after S seconds")
    load.add_argument("--warmup-requests", type=int, default=0,
                      help="requests sent first and left out of figures")
    load.add_argument("--timeout", type=float, default=60.0,
                      help="per-request timeout in seconds (default 60)")
    load.add_argument("--time-limit", type=float, default=None,
                      help="hard wall-clock cap per phase in seconds; requests in flight then count as "
                           "time_limit errors (default: duration + timeout, or at least 600)")
    load.add_argument("--sweep-concurrency", default=None, metavar="C1,C2,...",
                      help="run at each concurrency")
    load.add_argument("--sweep-rate", default=None, metavar="R1,R2,...", help="run at each request rate")
    load.add_argument("--seed", type=int, default=0)

    out = p.add_argument_group("output")
    out.add_argument("--slo", default=None, metavar="SPEC",
                     help="gates, e.g. ttft_p99=500ms,e2e_p99=6.5s,itl_p50=50ms,error_rate=1%%; metrics "
                          "ttft|itl|tpot|e2e _mean|_pNN (units us/ms/s) and error_rate (%%); "
                          "exit 1 if any fails")
    out.add_argument("--json", default=None, metavar="OUT.json", help="write the summary as JSON")
    out.add_argument("--plot", default=None, metavar="OUT.png",
                     help="latency against throughput, one point per sweep value (matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_soak_args(p: argparse.ArgumentParser) -> None:
    add_target_args(p, "base URL of a kvloom (or any OpenAI-compatible, with /v1/score) server")

    work = p.add_argument_group("workload")
    work.add_argument("--score-fraction", type=float, default=0.3,
                      help="fraction of requests that are /v1/score, spread evenly; the rest are chat "
                           "completions alternating streaming and non-streaming (default 0.3)")
    work.add_argument("--input-len", type=int, default=64, help="chat: words per user message (default 64)")
    work.add_argument("--max-tokens", type=int, default=32, help="chat: max_tokens (default 32)")
    add_score_args(work, query_tokens=256, num_items=20, item_tokens=8, label_token_ids="1,2")
    work.add_argument("--seed", type=int, default=0)

    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=2,
                      help="requests in flight, closed loop (default 2)")
    load.add_argument("--duration", type=float, default=1800.0,
                      help="stop sending after S seconds (default 1800)")
    load.add_argument("--max-requests", type=int, default=None, help="stop sending after N requests")
    load.add_argument("--timeout", type=float, default=60.0,
                      help="per-request timeout in seconds (default 60)")
    load.add_argument("--time-limit", type=float, default=None,
                      help="hard wall-clock cap in seconds; requests in flight then count as time_limit "
                           "errors (default: duration + timeout)")

    out = p.add_argument_group("output")
    out.add_argument("--progress-interval", type=float, default=10.0,
                     help="seconds between progress lines on stderr (default 10)")
    out.add_argument("--max-error-rate", type=float, default=0.0,
                     help="exit 1 when the error rate is above this fraction (default 0)")
    out.add_argument("--json", default=None, metavar="OUT.json", help="write the summary as JSON")


def add_fault_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Fault-handling release gate. Start the server with --enable-fault-injection and, for "
                     "the hang scenario, a short watchdog (e.g. kvloom serve --enable-fault-injection "
                     "--step-timeout 5): a hung step must be failed by the watchdog well within --timeout.")
    add_target_args(p, "base URL of the kvloom server", with_model=False)
    p.add_argument("--scenarios", default=DEFAULT_FAULT_SCENARIOS,
                   help=f"comma-separated, from {','.join(FAULT_SCENARIOS)} "
                        f"(default {DEFAULT_FAULT_SCENARIOS})")
    p.add_argument("--requests", type=int, default=10,
                   help="requests before the fault, without a restart, and after it (default 10)")
    p.add_argument("--load-requests", type=int, default=12,
                   help="concurrent requests under raise/kill/hang (default 12)")
    p.add_argument("--row-requests", type=int, default=50,
                   help="concurrent requests under fail_request/nan_request, one of them failed (default 50)")
    p.add_argument("--max-tokens", type=int, default=24,
                   help="max_tokens per request, ignore_eos (default 24)")
    p.add_argument("--after-steps", type=int, default=None,
                   help="engine steps before raise/kill/hang fires (default: about half the load's steps, "
                        "from max_running in /status)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="per-request timeout in seconds: a request unanswered by then counts as hung; keep "
                        "it well above the server's --step-timeout (default 30)")
    p.add_argument("--restart-timeout", type=float, default=300.0,
                   help="seconds POST /admin/restart may take (warm-up included; default 300)")
    p.add_argument("--at-once", type=float, default=2.0,
                   help="seconds within which a failed server must refuse each request (default 2)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the per-scenario results as JSON")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, with_dtype=False)
    p.add_argument("--peers", type=parse_peers, default=DEFAULT_PEERS,
                   help=f"comma-separated, from {', '.join(PEERS)} ('none' for kvloom alone); "
                        f"{' and '.join(LLAMA_CPP_PEERS)} as NAME:FORMAT, FORMAT one of "
                        f"{', '.join(GGUF_FORMATS)} (the model converted to a float GGUF, or the "
                        f"original file; default {GGUF_FORMATS[0]}) (default {','.join(DEFAULT_PEERS)})")
    p.add_argument("--workloads", type=comma_choices(COMPARE_WORKLOADS, "--workloads"),
                   default=COMPARE_WORKLOADS,
                   help=f"comma-separated, from {','.join(COMPARE_WORKLOADS)}")
    p.add_argument("--quick", action="store_true", help="everything scaled down: a smoke run")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the table and every measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure kvloom through its HTTP server (loopback, in this process; the "
                        "client a process of its own, as for llama-server)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="kvloom's weights (the peers keep theirs: transformers float32, llama.cpp each "
                        "peer's FORMAT) (default float32)")

    sizes = p.add_argument_group("sizes (default: the full or --quick set)")
    sizes.add_argument("--concurrency", type=parse_int_list, default=None, help="decode levels, e.g. 1,8,32")
    sizes.add_argument("--new-tokens", type=int, default=None, help="decode: tokens per request")
    sizes.add_argument("--prompt-tokens", type=int, default=None, help="decode: prompt tokens")
    sizes.add_argument("--prefill-tokens", type=int, default=None)
    sizes.add_argument("--repeats", type=int, default=None, help="prefill prompts and score calls (median)")

    llama = p.add_argument_group("llama.cpp")
    llama.add_argument("--llamacpp-threads", type=int, default=os.cpu_count() or 1,
                       help="threads of llama.cpp, in process and in llama-server (default: the CPU count)")
    llama.add_argument("--gguf-cache-dir", default="~/.cache/kvloom/compare",
                       help="where converted files are kept")
    llama.add_argument("--llama-server", default=None, metavar="PATH",
                       help="a llama-server binary to run (default: the one `kvloom build-llama-server` "
                            "built; the peer is skipped when there is none)")
    llama.add_argument("--server-start-timeout", type=float, default=180.0,
                       help="seconds llama-server may take to answer /health with 200")
    llama.add_argument("--request-timeout", type=float, default=3600.0, help="per HTTP request, seconds")

    add_engine_args(p, defaults_shown={"--max-running": "the highest concurrency or shared-prefix count"})
    add_compile_cache_arg(p)


def add_build_llama_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", default=LLAMA_SERVER_VERSION,
                   help="the llama-cpp-python release whose vendored llama.cpp is built (default "
                        f"{LLAMA_SERVER_VERSION}: the build `kvloom compare` runs, unless given "
                        "--llama-server)")
    p.add_argument("--sdist", default=None, metavar="FILE",
                   help="that release's source .tar.gz, already here (default: pip downloads it)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPU count)")
    p.add_argument("--force", action="store_true", help="build again when it is already built")


def add_router_args(p: argparse.ArgumentParser) -> None:
    from kvloom.api.router_policy import POLICIES

    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="a replica's base URL (repeat for several)")
    p.add_argument("--launch", type=int, default=0, metavar="N", help="start N local `kvloom serve` replicas")
    p.add_argument("--model", default=None,
                   help="the replicas' model (checkpoint directory or .gguf): its tokenizer matches "
                        "prefixes; with --launch, also the model served (default: the default model)")
    p.add_argument("--policy", choices=POLICIES, default="prefix")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-breaking RNG")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between /ready polls")
    p.add_argument("--health-timeout", type=float, default=5.0, help="seconds a /ready poll may take")
    p.add_argument("--fall", type=int, default=3, help="consecutive failures that take a replica out")
    p.add_argument("--rise", type=int, default=2, help="consecutive successes that bring it (back) in")
    p.add_argument("--read-timeout", type=float, default=300.0, help="longest upstream silence, seconds")
    p.add_argument("--enable-admin", action="store_true",
                   help="POST /admin/replicas, /admin/replicas/remove, /admin/replicas/drain {\"url\": ...}")
    p.add_argument("serve_flags", nargs=argparse.REMAINDER,
                   help="after --: flags for each launched `kvloom serve`")
