"""What a trial's benchmark means to the tuner: figures, SLO verdicts, feasibility, objective values and
the best trials. Pure functions over `kvloom bench --json` reports; no I/O, no Optuna.

    bench report -> figures_of(report): the figures of the chosen load point (one point, or the most loaded
        point at which every hard SLO holds) plus each SLO's verdict, marked hard or soft
    -> constraints(verdicts): one value per hard SLO, <= 0 when it holds (Optuna's convention)
    -> objective_values(figures, objectives): the values the sampler sees, never made up: a figure that
       was not measured makes the trial fail instead
    -> best_trials(trials, objectives): among completed, feasible trials only (a failed or infeasible trial
       is never best); one trial, or the Pareto front for two objectives

Latency figures are in milliseconds, throughputs per second, error_rate a fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from kvloom.tools.slo import LATENCY_METRICS, SLO, SUMMARY_STATS

THROUGHPUT_FIGURES = ("output_throughput", "request_throughput", "goodput", "items_per_s")
FIGURES = THROUGHPUT_FIGURES + ("error_rate",) + tuple(
    f"{metric}_{stat}" for metric in LATENCY_METRICS for stat in SUMMARY_STATS)
COUNT_FIGURES = ("num_requests", "completed", "num_errors", "input_tokens", "output_tokens", "duration_s")
FIGURE_UNITS = {**{f: "/s" for f in THROUGHPUT_FIGURES}, "error_rate": "fraction"}


@dataclass(frozen=True)
class TunedSLO:
    slo: SLO
    is_hard: bool = True


@dataclass(frozen=True)
class Objective:
    figure: str
    direction: str  # "maximize" or "minimize"

    @property
    def text(self) -> str:
        return f"{self.direction} {self.figure}"


def figure_unit(name: str) -> str:
    return FIGURE_UNITS.get(name, "ms")


def point_figures(summary: Mapping) -> dict:
    """The flat figures of one load point of a bench report."""
    figures = {name: summary.get(name) for name in THROUGHPUT_FIGURES + ("error_rate",) + COUNT_FIGURES}
    for metric in LATENCY_METRICS:
        stats = summary.get(f"{metric}_ms") or {}
        for stat in SUMMARY_STATS:
            figures[f"{metric}_{stat}"] = stats.get(stat)
    return figures


def point_verdicts(summary: Mapping, slos: Sequence[TunedSLO]) -> list[dict]:
    """Bench's verdict on each SLO of the study, marked hard or soft."""
    by_name = {v["name"]: v for v in summary.get("slos") or ()}
    verdicts = []
    for tuned in slos:
        v = by_name.get(tuned.slo.name)
        if v is None:
            raise ValueError(f"the bench report has no verdict for SLO {tuned.slo.name}")
        verdicts.append({"name": v["name"], "threshold": v["threshold"], "unit": v["unit"],
                         "threshold_value": v["threshold_value"], "measured": v["measured"],
                         "passed": bool(v["passed"]),
                         "violation_rate": v["violation_rate"], "hard": tuned.is_hard})
    return verdicts


def is_feasible(verdicts: Sequence[Mapping]) -> bool:
    return all(v["passed"] for v in verdicts if v["hard"])


def figures_of(report: Mapping, slos: Sequence[TunedSLO]) -> tuple[dict, list[dict], Optional[str]]:
    """(figures, verdicts, load label) of the load point that speaks for the trial: the only one, or
    with several (a concurrency or rate sweep) the last in sweep order whose hard SLOs all hold, else the
    first (the trial is then infeasible at every load)."""
    points = report.get("runs") or [report]
    chosen = points[0]
    for summary in points:
        if is_feasible(point_verdicts(summary, slos)):
            chosen = summary
    return point_figures(chosen), point_verdicts(chosen, slos), chosen.get("label")


def constraints(verdicts: Sequence[Mapping]) -> list[float]:
    """One value per hard SLO: measured - threshold (<= 0 holds). With nothing measured (every request
    failed) the SLO is violated: the value is the threshold itself, or 1 for a zero threshold."""
    values = []
    for v in verdicts:
        if not v["hard"]:
            continue
        if v["measured"] is None:
            values.append(float(v["threshold_value"]) or 1.0)
        elif v["passed"]:
            values.append(min(0.0, float(v["measured"]) - float(v["threshold_value"])))
        else:
            values.append(max(float(v["measured"]) - float(v["threshold_value"]), 1e-9))
    return values


def objective_values(figures: Mapping, objectives: Sequence[Objective]) -> list[float]:
    """The figures the objectives name; ValueError when one was not measured."""
    values = []
    for objective in objectives:
        value = figures.get(objective.figure)
        if value is None:
            raise ValueError(f"{objective.figure} was not measured (no request completed with it)")
        values.append(float(value))
    return values


def _better_or_equal(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    return all((x >= y) if o.direction == "maximize" else (x <= y) for x, y, o in zip(a, b, objectives))


def best_trials(trials: Sequence, objectives: Sequence[Objective]) -> list:
    """trials: objects with `.values` (None unless completed) and `.user_attrs["feasible"]`. The best
    feasible trial (ties: the earliest), or for two objectives the feasible Pareto front (sorted by the
    first objective, best first); [] when no trial is feasible."""
    feasible = [t for t in trials if t.values is not None and t.user_attrs.get("feasible") is True]
    front = [t for t in feasible
             if not any(_better_or_equal(o.values, t.values, objectives) and list(o.values) != list(t.values)
                        for o in feasible)]
    first = objectives[0]
    front.sort(key=lambda t: -t.values[0] if first.direction == "maximize" else t.values[0])
    return front if len(objectives) > 1 else front[:1]
