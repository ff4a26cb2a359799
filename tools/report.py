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
    return ["  ".join(c.ljust(w) if i < num_left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            .rstrip() for line in cells]


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
        print(f"{tool}: wrote {json_path}", file=sys.stderr, flush=True)
    return report
