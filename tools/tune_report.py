"""What a `kvloom tune` study looks like: the trial table as text and a self-contained HTML report.

Everything is read back from the study database (the trials' user attributes and the study's
`kvloom_study` attribute), so `kvloom tune report DB -o report.html` works at any time, also while a
study runs. The HTML page inlines plotly.js (no network needed to open it):

  - a scatter of two figures (default output throughput against p90 e2e latency), and one more per
    SLO figure not on it; each SLO threshold a red dashed reference line with its label; feasible,
    infeasible (a hard SLO failed) and best trials marked, failed trials counted in the legend;
  - a per-knob effect plot: each knob's values against the first objective;
  - the trial table: knobs, figures, SLO verdicts, status and failure reason.
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

from kvloom.tools.tune_score import FIGURES, Objective, best_trials, figure_unit

STUDY_ATTR = "kvloom_study"
_STYLES = {"ok": ("feasible", "#1f77b4", "circle"),
           "infeasible": ("infeasible (hard SLO failed)", "#ff7f0e", "x")}


def load_report_study(url: str, study_name: Optional[str] = None):
    """(study, info) from a storage URL; the only study, or the one named."""
    import optuna

    summaries = optuna.get_all_study_summaries(url, include_best_trial=False)
    names = [s.study_name for s in summaries]
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}): "
                             "name one with --study-name")
        study_name = names[0]
    elif study_name not in names:
        raise ValueError(f"--study-name: no study {study_name!r} in {url} ({', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=url)
    info = study.user_attrs.get(STUDY_ATTR)
    if info is None:
        raise ValueError(f"study {study_name!r} was not made by kvloom tune (no {STUDY_ATTR} attribute)")
    return study, info


def objectives_of(info: dict) -> list[Objective]:
    return [Objective(o["figure"], o["direction"]) for o in info["objectives"]]


def trial_status(trial) -> str:
    """ok, infeasible, failed, or the Optuna state of a trial still running."""
    return trial.user_attrs.get("status") or trial.state.name.lower()


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def table_columns(info: dict) -> list[str]:
    """The figures shown per trial: the objectives' figures, then each SLO's."""
    columns = [o["figure"] for o in info["objectives"]]
    for slo in info["slos"]:
        if slo["name"] not in columns:
            columns.append(slo["name"])
    return columns


def table_rows(trials: Sequence, info: dict) -> tuple[list[str], list[list[str]]]:
    knobs, figures = info["knobs"], table_columns(info)
    header = ["#"] + knobs + figures + ["warm-up s", "status", "reason"]
    rows = []
    for t in trials:
        attrs = t.user_attrs
        knob_values = attrs.get("knobs") or t.params
        verdicts = {v["name"]: v for v in attrs.get("slos") or ()}
        cells = [str(t.number)] + [_fmt(knob_values.get(k)) for k in knobs]
        for name in figures:
            cell = _fmt(attrs.get(name))
            if name in verdicts and not verdicts[name]["passed"]:
                cell += "!" if verdicts[name]["hard"] else "~"
            cells.append(cell)
        reason = attrs.get("failure") or ", ".join(
            f"{v['name']} > {v['threshold']}" for v in verdicts.values() if not v["passed"])
        rows.append(cells + [_fmt(attrs.get("warmup_s")), trial_status(t), reason or ""])
    return header, rows


def format_table(trials: Sequence, info: dict) -> str:
    """The trial table as text; `!` marks a failed hard SLO, `~` a failed soft one."""
    header, rows = table_rows(trials, info)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["\ntrials (latencies in ms; ! a hard SLO failed, ~ a soft one)",
             "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_trial_line(trial, info: dict) -> str:
    """One line per finished trial, printed as the study runs."""
    knobs = trial.user_attrs.get("knobs") or trial.params
    status = trial_status(trial)
    text = f"trial {trial.number} [{' '.join(f'{k}={v}' for k, v in knobs.items())}]: {status}"
    if status == "failed":
        return text + f": {trial.user_attrs.get('failure')}"
    figures = ", ".join(f"{name}={_fmt(trial.user_attrs.get(name))}" for name in table_columns(info))
    return text + f" ({figures}; warm-up {trial.user_attrs.get('warmup_s', 0):.0f} s)"


# ---- HTML -----------------------------------------------------------------------------------------

def _axis_title(figure: str) -> str:
    unit = figure_unit(figure)
    return f"{figure} ({unit})" if unit != "fraction" else figure


def _hover(trial, knobs: Sequence[str]) -> str:
    values = trial.user_attrs.get("knobs") or trial.params
    return f"trial {trial.number}<br>" + "<br>".join(f"{k}={values.get(k)}" for k in knobs)


def scatter_figure(trials: Sequence, info: dict, x: str, y: str):
    """Trials on (x, y) with the SLO lines of both axes; infeasible and best trials marked."""
    import plotly.graph_objects as go

    best = {t.number for t in best_trials(trials, objectives_of(info))}
    fig = go.Figure()
    for status, (name, color, symbol) in _STYLES.items():
        points = [t for t in trials if trial_status(t) == status
                  and t.user_attrs.get(x) is not None and t.user_attrs.get(y) is not None]
        fig.add_trace(go.Scatter(
            x=[t.user_attrs[x] for t in points], y=[t.user_attrs[y] for t in points], mode="markers",
            name=f"{name}: {len(points)}", marker=dict(color=color, symbol=symbol, size=11),
            text=[_hover(t, info["knobs"]) for t in points], hoverinfo="text+x+y"))
    chosen = [t for t in trials if t.number in best and t.user_attrs.get(x) is not None
              and t.user_attrs.get(y) is not None]
    fig.add_trace(go.Scatter(
        x=[t.user_attrs[x] for t in chosen], y=[t.user_attrs[y] for t in chosen], mode="markers+text",
        name="best", text=[f"best: trial {t.number}" for t in chosen], textposition="top center",
        marker=dict(color="#2ca02c", size=24, symbol="star-open", line=dict(width=3))))
    num_failed = sum(trial_status(t) == "failed" for t in trials)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"failed (no figures): {num_failed}",
                             marker=dict(color="#7f7f7f", symbol="circle-x", size=11)))
    for slo in info["slos"]:
        label = f"SLO {slo['name']} ≤ {slo['threshold']} ({'hard' if slo['hard'] else 'soft'})"
        line = dict(color="red", dash="dash", width=2)
        if slo["name"] == y:
            fig.add_hline(y=slo["threshold_value"], line=line, annotation_text=label,
                          annotation_position="top left", annotation_font_color="red")
        if slo["name"] == x:
            fig.add_vline(x=slo["threshold_value"], line=line, annotation_text=label,
                          annotation_position="top right", annotation_font_color="red")
    fig.update_layout(title=f"{y} against {x}", xaxis_title=_axis_title(x), yaxis_title=_axis_title(y),
                      template="plotly_white", height=480)
    return fig


def knob_effect_figure(trials: Sequence, info: dict):
    """Each knob's values (x) against the first objective's figure (y), one panel per knob."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = info["objectives"][0]["figure"]
    knobs = info["knobs"]
    fig = make_subplots(rows=1, cols=len(knobs), subplot_titles=knobs, shared_yaxes=True)
    for col, knob in enumerate(knobs, 1):
        for status, (name, color, symbol) in _STYLES.items():
            points = [t for t in trials if trial_status(t) == status and t.user_attrs.get(figure) is not None]
            fig.add_trace(go.Scatter(
                x=[str((t.user_attrs.get("knobs") or t.params).get(knob)) for t in points],
                y=[t.user_attrs[figure] for t in points], mode="markers", name=name, legendgroup=status,
                showlegend=col == 1, marker=dict(color=color, symbol=symbol, size=10),
                text=[_hover(t, knobs) for t in points], hoverinfo="text+y"), row=1, col=col)
        fig.update_xaxes(type="category", title_text=knob, row=1, col=col)
    fig.update_yaxes(title_text=_axis_title(figure), row=1, col=1)
    fig.update_layout(title=f"per-knob effect on {figure}", template="plotly_white", height=420)
    return fig


def _html_table(trials: Sequence, info: dict) -> str:
    header, rows = table_rows(trials, info)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr class='{}'>{}</tr>".format(
        html.escape(r[-2]), "".join(f"<td>{html.escape(c)}</td>" for c in r)) for r in rows)
    return f"<table id='trials'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(study, info: dict, x: str = "output_throughput", y: str = "e2e_p90") -> str:
    for name, value in (("--x", x), ("--y", y)):
        if value not in FIGURES:
            raise ValueError(f"{name}: unknown figure {value!r}; figures: {', '.join(FIGURES)}")
    trials = study.get_trials(deepcopy=False)
    figures = [scatter_figure(trials, info, x, y)]
    figures += [scatter_figure(trials, info, x, slo["name"]) for slo in info["slos"]
                if slo["name"] not in (x, y) and slo["name"] in FIGURES]
    figures.append(knob_effect_figure(trials, info))
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"plot-{i}")
                    for i, f in enumerate(figures))
    best = best_trials(trials, objectives_of(info))
    best_text = ("no feasible configuration yet" if not best else "best: " + ", ".join(
        f"trial {t.number} ({t.user_attrs.get('serve_command')})" for t in best))
    slos = "; ".join(f"{s['name']} ≤ {s['threshold']} ({'hard' if s['hard'] else 'soft'})"
                     for s in info["slos"])
    objectives = ", ".join(f"{o['direction']} {o['figure']}" for o in info["objectives"])
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>kvloom tune: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} tr.failed{{color:#888}}
tr.infeasible{{color:#c60}}</style></head>
<body><h1>kvloom tune: {html.escape(study.study_name)}</h1>
<p>{len(trials)} trials; objectives: {html.escape(objectives)}; SLOs: {html.escape(slos or 'none')}</p>
<p id="best">{html.escape(best_text)}</p>
{plots}
<h2>trials</h2>
{_html_table(trials, info)}
</body></html>
"""


def write_report(path: str, study, info: dict, x: str = "output_throughput", y: str = "e2e_p90") -> None:
    text = report_html(study, info, x, y)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
