"""Latency against throughput for a `kvloom bench` sweep, as a PNG (matplotlib, Agg, no pyplot
state): one panel per latency metric (p50 and p99 lines, one labelled point per sweep value),
SLO thresholds on that metric drawn as dashed horizontal lines."""

from __future__ import annotations

from typing import Sequence

from kvloom.tools.slo import SLO

_COLORS = {"p50": "tab:blue", "p99": "tab:orange"}
_TITLES = {"ttft": "time to first token", "e2e": "end-to-end latency", "itl": "inter-token latency",
           "tpot": "time per output token"}


def plot_metrics(workload: str, slos: Sequence[SLO]) -> list[str]:
    """The panels: TTFT and e2e for generation (plus any other latency metric an SLO names), e2e
    alone for scoring."""
    metrics = ["e2e"] if workload == "score" else ["ttft", "e2e"]
    for slo in slos:
        if slo.is_latency and slo.metric not in metrics:
            metrics.append(slo.metric)
    return metrics


def plot_sweep(path: str, runs: Sequence[dict], labels: Sequence[str], *, workload: str,
               slos: Sequence[SLO] = ()) -> None:
    """runs: bench summaries (one per sweep value, labels[i] names it, e.g. "c=4")."""
    from matplotlib.figure import Figure

    metrics = plot_metrics(workload, slos)
    x_key, x_label = (("items_per_s", "scored items/s") if workload == "score"
                      else ("output_throughput", "output tokens/s"))
    fig = Figure(figsize=(5.5 * len(metrics), 4.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for stat_name in ("p50", "p99"):
            points = [(run[x_key], run[f"{metric}_ms"][stat_name], label)
                      for run, label in zip(runs, labels) if run[f"{metric}_ms"][stat_name] is not None]
            if not points:
                continue
            xs, ys, names = zip(*points)
            ax.plot(xs, ys, marker="o", color=_COLORS[stat_name], label=f"{metric} {stat_name}")
            if stat_name == "p99":  # one label per sweep point, on the upper line
                for x, y, name in zip(xs, ys, names):
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for slo in slos:
            if slo.metric == metric:
                ax.axhline(slo.threshold * 1e3, color="tab:red", linestyle="--", linewidth=1,
                           label=f"SLO {slo.name} = {slo.text}")
        ax.set_title(_TITLES[metric])
        ax.set_xlabel(x_label)
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=100)
