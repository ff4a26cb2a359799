"""The router's policies side by side on one multi-session shared-prefix workload, in one run.

    python -m kvloom.tools.bench_router [--model PATH] [--sessions 16] [--context-words 1000] [--turns 4]
        [--policies prefix,round_robin,least_load] [--json OUT.json] -- [kvloom serve flags]

Starts 2 `kvloom serve` replicas once (tools/router_cli.py's launcher), then for each policy a
`kvloom router` in front of them and `kvloom bench` through it: each session has its own long
context and its turns grow a history (turn t = context + t questions), sent turn by turn at a
concurrency of one request per session. Each policy gets its own sessions (a fresh seed), so no
policy reuses what another cached. The prefix-cache hit rate comes from the replicas' own
/metrics (hit tokens / looked-up tokens over the policy's run); TTFT and throughput from
`kvloom bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvloom.engine.metrics import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES
from kvloom.tools.workload import WORDS
from kvloom.tools.router_cli import die_with_parent, free_port, launch_replicas, stop_replicas


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")


def cache_counters(urls) -> tuple[float, float]:
    """(prefix-cache hit tokens, looked-up tokens), summed over the replicas; an error when a replica
    does not export them (a hit rate of 0 would not say that nothing was measured)."""
    names = {f"{PREFIX_CACHE_HITS}_total": 0, f"{PREFIX_CACHE_QUERIES}_total": 1}
    totals = [0.0, 0.0]
    for url in urls:
        seen = set()
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                for sample in family.samples:
                    if sample.name in names:
                        totals[names[sample.name]] += sample.value
                        seen.add(sample.name)
        if seen != set(names):
            raise RuntimeError(f"{url}/metrics has no {' or '.join(sorted(set(names) - seen))}")
    return totals[0], totals[1]


def session_prompts(seed: int, num_sessions: int, context_words: int, num_turns: int,
                    question_words: int = 12) -> list[dict]:
    """Turn-major lines: every session's turn 1 (in a shuffled order), then every session's turn 2, ..."""
    import random

    rng = random.Random(seed)
    contexts = [" ".join(rng.choice(WORDS) for _ in range(context_words)) for _ in range(num_sessions)]
    questions = [[" ".join(rng.choice(WORDS) for _ in range(question_words)) for _ in range(num_turns)]
                 for _ in range(num_sessions)]
    lines = []
    for t in range(num_turns):  # sessions in a new order each turn: no policy keeps affinity by accident
        order = list(range(num_sessions))
        rng.shuffle(order)
        lines.extend({"prompt": contexts[s] + " " + " ".join(questions[s][:t + 1])} for s in order)
    return lines


def run_policy(policy: str, seed: int, replica_urls, args, workdir: str) -> dict:
    prompts = session_prompts(seed, args.sessions, args.context_words, args.turns, args.question_words)
    prompts_path = os.path.join(workdir, f"{policy}.jsonl")
    with open(prompts_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kvloom.tools.cli", "router", "--port", str(port), "--policy", policy,
           "--health-interval", "0.2"] + [a for u in replica_urls for a in ("--replica", u)]
    if args.model:
        cmd += ["--model", args.model]
    router = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=die_with_parent)  # gone with this process, however it ends
    try:
        wait_ready(url, 120)
        before = cache_counters(replica_urls)
        report_path = os.path.join(workdir, f"{policy}.json")
        bench = [sys.executable, "-m", "kvloom.tools.cli", "bench", "--url", url,
                 "--prompts-file", prompts_path, "--concurrency", str(args.sessions),
                 "--num-requests", str(len(prompts)),
                 "--output-len", str(args.output_len), "--ignore-eos", "--no-progress", "--timeout", "600",
                 "--json", report_path]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        after = cache_counters(replica_urls)
        with open(report_path) as f:
            summary = json.load(f)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            selections = {s.labels["replica"]: int(s.value)
                          for fam in text_string_to_metric_families(r.read().decode())
                          for s in fam.samples if s.name == "kvloom_router_selections_total"}
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(60)
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {"policy": policy, "hit_rate": hits / queries if queries else 0.0,
            "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
            "output_tok_s": summary["output_throughput"], "req_s": summary["request_throughput"],
            "errors": summary["num_errors"], "selections": [selections.get(u, 0) for u in replica_urls]}


def format_table(rows) -> str:
    lines = [f"{'policy':<13}{'hit rate':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'out tok/s':>11}{'req/s':>8}"
             f"{'errors':>8}  requests per replica"]
    for r in rows:
        lines.append(f"{r['policy']:<13}{100 * r['hit_rate']:>8.1f}%{r['ttft_p50_ms']:>8.0f}ms"
                     f"{r['ttft_p99_ms']:>8.0f}ms{r['output_tok_s']:>11.1f}{r['req_s']:>8.2f}{r['errors']:>8}"
                     f"  {r['selections']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvloom.tools.bench_router",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="served by both replicas (default: the default model)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--context-words", type=int, default=1000, help="words of each session's own context")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--question-words", type=int, default=12, help="words each turn adds to the history")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--policies", default="prefix,round_robin,least_load")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds the replicas get to warm up")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("serve_flags", nargs=argparse.REMAINDER, help="after --: flags for each `kvloom serve`")
    args = p.parse_args(argv)
    serve_flags = list(args.serve_flags)
    if "--no-access-log" not in serve_flags:
        serve_flags.append("--no-access-log")  # the replicas' logs stay readable: no line per /ready poll
    children = launch_replicas(args.replicas, args.model, serve_flags)
    try:
        urls = [url for _, url in children]
        for url in urls:
            wait_ready(url, args.ready_timeout)
        rows = []
        with tempfile.TemporaryDirectory(prefix="kvloom-bench-router-") as workdir:
            for seed, policy in enumerate(args.policies.split(","), start=1):
                rows.append(run_policy(policy, seed, urls, args, workdir))
                print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        stop_replicas(children)
    print(f"{args.replicas} replicas, {args.sessions} sessions x {args.turns} turns, "
          f"{args.context_words}-word contexts, {args.output_len} output tokens, concurrency {args.sessions}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
