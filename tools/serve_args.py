"""The flags of `kvloom serve`, declared once: the command line builds its parser from them, and
`kvloom tune` checks a study's knobs and fixed flags against the very same parser."""

from __future__ import annotations

import argparse

from kvloom.tools.engine_args import add_compile_cache_arg, add_engine_args, add_model_args

API_KEY_ENV = "KVLOOM_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_engine_args(p, serve=True)
    add_compile_cache_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 30)")
    p.add_argument("--enable-admin", action="store_true",
                   help="add POST /admin/restart (and /admin/faults) (default off)")
    p.add_argument("--enable-fault-injection", action="store_true",
                   help="arm faults through POST /admin/faults, for tests and the fault tool (default off)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /ready and "
                        f"/metrics (default: the environment variable {API_KEY_ENV}, else no key)")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log a line per request: method, path, status, latency, request id "
                        "(default: logged)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="level of kvloom's own log lines; libraries log only warnings and errors "
                        "(default info)")
    p.add_argument("--fault-at-start", default=None, metavar="KIND",
                   help="arm one fault before the engine starts, e.g. fail_warmup (implies "
                        "--enable-fault-injection; default none)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="flags from a YAML file (e.g. `kvloom tune --output`); command-line flags win "
                        "(default none)")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom serve")
    add_serve_args(parser)
    return parser
