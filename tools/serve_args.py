"""The flags of `kvloom serve`, declared once: the command line builds its parser from them, and
`kvloom tune` checks a study's knobs and fixed flags against the very same parser."""

from __future__ import annotations

import argparse

from kvloom.tools.engine_args import add_compile_cache_arg, add_engine_args, add_model_args


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_engine_args(p, serve=True)
    add_compile_cache_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    p.add_argument("--enable-admin", action="store_true", help="POST /admin/restart (and /admin/faults)")
    p.add_argument("--enable-fault-injection", action="store_true",
                   help="arm faults through POST /admin/faults (tests and the fault tool)")
    p.add_argument("--fault-at-start", default=None, metavar="KIND",
                   help="arm one fault before the engine starts, e.g. fail_warmup (implies "
                        "--enable-fault-injection)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="flags from a YAML file (e.g. `kvloom tune --output`); command-line flags win")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom serve")
    add_serve_args(parser)
    return parser
