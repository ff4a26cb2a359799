"""`kvloom router`: the router, and --launch N local `kvloom serve` replicas as child processes
(the flags are declared in tools/command_args.py).

    kvloom router --replica http://10.0.0.1:8000 --replica http://10.0.0.2:8000 [--policy prefix]
    kvloom router --launch 2 --model PATH -- --num-pages 2048 --max-running 16

With --launch, each replica is `kvloom serve` on a free loopback port with the flags after `--`
(plus --model); the router stops them by their own PIDs (SIGTERM, then SIGKILL after a grace
period) when it stops, and on Linux they also get SIGTERM if the router dies.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
from typing import Optional

DEFAULT_LAUNCH_NUM_PAGES = "2048"  # four replicas and the router fit in a few GiB with the default model


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """For Popen's preexec_fn: the child gets SIGTERM when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch_replicas(n: int, model: Optional[str], serve_flags: list[str], host: str = "127.0.0.1"):
    """Start n `kvloom serve` children; returns [(process, url)]."""
    flags = [f for f in serve_flags if f != "--"]
    if "--num-pages" not in flags:
        flags += ["--num-pages", DEFAULT_LAUNCH_NUM_PAGES]
    if model is not None:
        flags += ["--model", model]
    children = []
    for _ in range(n):
        port = free_port(host)
        cmd = [sys.executable, "-m", "kvloom.tools.cli", "serve", "--host", host, "--port", str(port), *flags]
        children.append((subprocess.Popen(cmd, preexec_fn=die_with_parent), f"http://{host}:{port}"))
    return children


def stop_replicas(children, grace_s: float = 30.0) -> None:
    for proc, _ in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in children:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main_from_args(args) -> int:
    import uvloop

    from kvloom.api.router_app import RouterConfig, serve_router
    from kvloom.api.router_membership import HealthConfig
    from kvloom.api.router_proxy import ProxyConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.replica and not args.launch:
        print("kvloom router: give --replica URL (repeatable) or --launch N", file=sys.stderr)
        return 2
    if args.serve_flags and not args.launch:
        print("kvloom router: flags after -- are for --launch replicas only", file=sys.stderr)
        return 2
    tokenizer = args.model
    if tokenizer is None:
        from kvloom.engine.models.loader import default_model_path

        try:
            tokenizer = default_model_path()
        except Exception as exc:  # noqa: BLE001 - text prompts then route without prefix knowledge
            print(f"kvloom router: no tokenizer ({exc}); only token-id prompts are matched", file=sys.stderr)
    children = launch_replicas(args.launch, args.model, args.serve_flags) if args.launch else []
    try:
        config = RouterConfig(
            replicas=tuple(args.replica) + tuple(url for _, url in children), policy=args.policy,
            seed=args.seed, tokenizer=tokenizer, enable_admin=args.enable_admin,
            health=HealthConfig(interval_s=args.health_interval, timeout_s=args.health_timeout,
                                fall=args.fall, rise=args.rise),
            proxy=ProxyConfig(read_timeout_s=args.read_timeout))
        uvloop.run(serve_router(config, args.host, args.port))
    finally:
        stop_replicas(children)
    print("kvloom router: stopped", flush=True)
    return 0


if __name__ == "__main__":
    from kvloom.tools.command_args import add_router_args

    parser = argparse.ArgumentParser(prog="kvloom router")
    add_router_args(parser)
    sys.exit(main_from_args(parser.parse_args()))
