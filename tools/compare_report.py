"""The `kvloom compare` report: figures with their roofline bounds, rows of kvloom beside each peer
in the same mode, the printed table.

    figures(sizes, workloads, roofline) -> Figure per measured key ("decode@8", "prefill", ...)
    build_rows(figures, measurements, peers) -> one row per figure and mode (in process, HTTP) that has
        any value: kvloom's, each peer's, kvloom/peer and kvloom/roofline
    report_lines(report) -> the printed text: one table per mode, with that mode's peers that ran

Peers are specs of tools.command_args.parse_peers: "hf", "llamacpp:f32", "llama-server:f16".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from kvloom.tools.command_args import peer_format, peer_name
from kvloom.tools.compare_workloads import Sizes
from kvloom.tools.machine import Roofline
from kvloom.tools.report import format_table, format_value, ratio

IN_PROCESS, HTTP = "in process", "HTTP"
PEER_MODES = {"hf": IN_PROCESS, "llamacpp": IN_PROCESS, "llama-server": HTTP}  # by peer name
PEER_LABELS = {"hf": "transformers", "llamacpp": "llama.cpp", "llama-server": "llama-server"}


def peer_mode(spec: str) -> str:
    return PEER_MODES[peer_name(spec)]


@dataclass(frozen=True)
class Figure:
    key: str  # "decode@8", "prefill", "shared-prefix", "score": the measurements' key
    workload: str
    label: str
    unit: str
    roofline: float  # same unit


def figures(sizes: Sizes, workloads: Sequence[str], roof: Roofline) -> list[Figure]:
    out = []
    if "decode" in workloads:
        out += [Figure(f"decode@{c}", "decode", f"decode tok/s @{c}", "tok/s", roof.decode_tok_s(c))
                for c in sizes.concurrency]
    if "prefill" in workloads:
        out.append(Figure("prefill", "prefill", f"prefill tok/s ({sizes.prefill_tokens}-tok prompt)", "tok/s",
                          roof.compute_tok_s))
    if "shared-prefix" in workloads:
        label = (f"shared-prefix tok/s ({sizes.num_shared_requests}x "
                 f"{sizes.prefix_tokens}+{sizes.unique_tokens})")
        out.append(Figure("shared-prefix", "shared-prefix", label, "tok/s",
                          roof.decode_tok_s(sizes.num_shared_requests)))
    if "score" in workloads:
        label = f"score items/s ({sizes.num_items}x{sizes.item_tokens}, q{sizes.query_tokens})"
        out.append(Figure("score", "score", label, "items/s",
                          roof.score_items_s(sizes.query_tokens, sizes.num_items, sizes.item_tokens)))
    return out


def peer_label(spec: str, gguf_tag: Optional[str] = None) -> str:
    """"llama-server F16": the peer's name and the file it runs (gguf_tag, as the model file tags it,
    else the format asked for)."""
    if gguf_tag is None:
        gguf_tag = (peer_format(spec) or "").upper()
    return f"{PEER_LABELS[peer_name(spec)]} {gguf_tag}".strip()


def build_rows(figs: Sequence[Figure], measurements: dict, peers: Sequence[str]) -> list[dict]:
    """One row per figure and mode that has any value: kvloom's, each peer's in the same mode (None for
    the other mode and for a peer that did not run), the ratios kvloom/peer and kvloom/roofline."""
    rows = []
    for fig in figs:
        for mode, kvloom_system in ((IN_PROCESS, "kvloom"), (HTTP, "kvloom-http")):
            kvloom = measurements.get(kvloom_system, {}).get(fig.key, {}).get("value")
            values = {p: measurements.get(p, {}).get(fig.key, {}).get("value") for p in peers
                      if peer_mode(p) == mode}
            values.update({p: None for p in peers if p not in values})
            if kvloom is None and all(v is None for v in values.values()):
                continue
            rows.append(dict(figure=f"{fig.label} ({mode})", key=fig.key, workload=fig.workload, mode=mode,
                             unit=fig.unit, kvloom=kvloom, peers=values,
                             kvloom_over_peer={p: ratio(kvloom, v) for p, v in values.items()},
                             roofline=fig.roofline, kvloom_over_roofline=ratio(kvloom, fig.roofline)))
    return rows


def table_cells(rows: Sequence[dict], labels: dict[str, str]) -> list[list[str]]:
    """Header + one line of cells per row; `labels`: the peers shown, name -> column title."""
    header = ["figure", "kvloom", *labels.values(), *[f"kvloom/{t}" for t in labels.values()],
              "kvloom/roofline", "roofline"]
    cells = [header]
    for row in rows:
        fraction = row["kvloom_over_roofline"]
        cells.append([row["figure"], format_value(row["kvloom"], ".1f"),
                      *[format_value(row["peers"].get(p), ".1f") for p in labels],
                      *[format_value(row["kvloom_over_peer"].get(p), ".2f", "x") for p in labels],
                      format_value(None if fraction is None else 100 * fraction, ".1f", "%"),
                      format_value(row["roofline"], ".1f")])
    return cells


def report_lines(report: dict) -> list[str]:
    roof = report["roofline"]
    shown = {p: s["label"] for p, s in report["peers"].items() if s["status"] == "ok"}
    dtype = report.get("dtype", "float32")
    lines = [f"kvloom compare: {report['model']} ({report['num_parameters'] / 1e6:.1f}M params, kvloom "
             f"{dtype}, "
             f"{report['cpu_count']} CPUs)",
             f"machine: {dtype} matmul peak {roof['peak_gflops']:.1f} GFLOP/s, memory bandwidth "
             f"{roof['bandwidth_gb_s']:.2f} GB/s",
             f"roofline: compute {roof['compute_tok_s']:.1f} tok/s (peak / 2 x params); decode at batch B "
             f"also <= B x {roof['memory_tok_s_batch1']:.1f} tok/s (bandwidth / params x "
             f"{roof['weight_bytes'] // roof['num_parameters']} B)",
             ""]
    for mode in (IN_PROCESS, HTTP):
        rows = [row for row in report["rows"] if row["mode"] == mode]
        if rows:
            lines += format_table(table_cells(rows, {p: label for p, label in shown.items()
                                                     if peer_mode(p) == mode}))
            lines.append("")
    for peer, status in report["peers"].items():
        if status["status"] != "ok":
            lines.append(f"{status['status']}: {status['label']}: {status['message']}")
    if any(peer_name(p) == "llamacpp" for p in shown):
        lines.append("note: llama-cpp-python in process runs one sequence at a time: its @C figures are C "
                     "requests in turn")
    if any(peer_name(p) == "llama-server" for p in shown):
        lines.append("note: llama-server runs one slot per concurrent request (continuous batching), over "
                     "HTTP with the same client and prompts as kvloom's server")
    if dtype != "float32":
        lines.append(f"note: kvloom runs {dtype} weights against float32 transformers; the roofline is "
                     f"{dtype}'s")
    elif any(peer_format(p) == "f16" for p in shown):
        lines.append("note: an F16 peer reads half the weight bytes of kvloom's float32 per decode step (the "
                     "roofline is float32's)")
    return lines
