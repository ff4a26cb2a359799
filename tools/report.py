"""Report helpers every measuring tool shares: figures as text, ratios, aligned tables, JSON files."""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional, Sequence


def format_value(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    """A figure as text; "-" for a missing one."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_ms(value: Optional[float]) -> str:
    """A latency in milliseconds as text; "-" for a missing one."""
    return format_value(value, ".1f")


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_table(cells: Sequence[Sequence[str]], num_left: int = 1) -> list[str]:
    """Rows of cells, columns as wide as their widest cell, two spaces apart; the first num_left
    columns left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) if i < num_left else c.rjust(w) for i, (c, w) in enumerate(zip(line,
                                                                                                widths)))
            .rstrip() for line in cells]


def log(tool: str, message: str) -> None:
    """A progress line on stderr, prefixed with the tool's name."""
    print(f"{tool}: {message}", file=sys.stderr, flush=True)


def print_figures(title: str, rows: Sequence[str], notes: Sequence[str], file=None) -> None:
    """A benchmark's printout: a blank line and the title, the table's rows, a blank line, the notes."""
    file = file or sys.stdout
    print(f"\n{title}", file=file)
    for line in list(rows) + [""] + list(notes):
        print(line, file=file)


def write_json(path: Optional[str], report: dict) -> None:
    """The report as indented JSON at path; nothing when path is None."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def publish(report: dict, print_report: Callable[[dict], None], json_path: Optional[str], tool: str) -> dict:
    """Print a benchmark's report and, when asked, write it as JSON (said on stderr)."""
    print_report(report)
    if json_path:
        write_json(json_path, report)
        log(tool, f"wrote {json_path}")
    return report
