"""The flags of `kvloom tune` (declarations only: building the `kvloom` parser loads nothing of the tuner)."""

from __future__ import annotations

import argparse

DEFAULT_STORAGE = "sqlite:///tune.db"


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", metavar="STUDY.yaml", help="the study file; or `report` to rebuild a report")
    p.add_argument("database", nargs="?", default=None, metavar="DB",
                   help="with `report`: the study database (a path or an Optuna storage URL)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage URL or SQLite file (default {DEFAULT_STORAGE})")
    p.add_argument("--resume", action="store_true", help="continue the study of this name in the storage")
    p.add_argument("--output", default=None, metavar="BEST.yaml",
                   help="write the best feasible configuration for `kvloom serve --config`")
    p.add_argument("--report", "-o", default=None, metavar="REPORT.html",
                   help="a self-contained HTML report (plotly): SLO lines, best trial, per-knob effects")
    p.add_argument("--x", default="output_throughput", help="the report's scatter x figure")
    p.add_argument("--y", default="e2e_p90", help="the report's scatter y figure")
    p.add_argument("--study-name", default=None, help="with `report`: which study (default: the only one)")
    p.add_argument("--work-dir", default=None,
                   help="trial logs and bench reports (default: DB-trials/STUDY beside an SQLite database)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
