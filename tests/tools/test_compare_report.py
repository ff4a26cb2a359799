"""tools.compare_report: figures with their roofline bounds, rows of kvloom beside each peer, the table."""

import pytest

from kvloom.tools import compare_report, compare_workloads
from kvloom.tools.command_args import COMPARE_WORKLOADS
from kvloom.tools.machine import Roofline
from kvloom.tools.report import format_table

pytestmark = pytest.mark.timeout(30)


def test_figures_and_their_roofline():
    roof = Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    figs = compare_report.figures(compare_workloads.FULL, COMPARE_WORKLOADS, roof)
    assert [f.key for f in figs] == ["decode@1", "decode@8", "decode@32", "prefill", "shared-prefix", "score"]
    by_key = {f.key: f for f in figs}
    assert by_key["decode@8"].roofline == pytest.approx(800.0)
    assert by_key["prefill"].roofline == pytest.approx(1000.0) and "512-tok" in by_key["prefill"].label
    assert by_key["shared-prefix"].roofline == pytest.approx(1000.0)  # 16 x 100 > compute
    assert "16x 400+32" in by_key["shared-prefix"].label and by_key["score"].unit == "items/s"
    assert [f.key for f in compare_report.figures(compare_workloads.QUICK, ["prefill"], roof)] == ["prefill"]


def test_rows_pair_each_peer_with_kvloom_in_its_own_mode():
    roof = Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    figs = compare_report.figures(compare_workloads.FULL, ["decode", "score"], roof)
    measurements = {
        "kvloom": {"decode@1": {"value": 50.0}, "decode@8": {"value": 400.0}, "score": {"value": 20.0}},
        "kvloom-http": {"decode@1": {"value": 40.0}},
        "hf": {"decode@1": {"value": 25.0}, "decode@8": {"value": 100.0}, "score": {"value": 10.0}},
        "llama-server:f32": {"decode@1": {"value": 80.0}},
    }
    rows = compare_report.build_rows(figs, measurements, ["hf", "llamacpp:f32", "llama-server:f32"])
    assert [(r["key"], r["mode"]) for r in rows] == [
        ("decode@1", "in process"), ("decode@1", "HTTP"), ("decode@8", "in process"), ("score", "in process")]
    first, http = rows[0], rows[1]
    assert first["peers"] == {"hf": 25.0, "llamacpp:f32": None, "llama-server:f32": None}
    assert first["kvloom_over_peer"]["hf"] == pytest.approx(2.0)
    assert first["kvloom_over_peer"]["llamacpp:f32"] is None
    assert first["kvloom_over_roofline"] == pytest.approx(0.5)  # 50 of 100 tok/s
    assert http["peers"] == {"hf": None, "llamacpp:f32": None, "llama-server:f32": 80.0}
    assert http["kvloom_over_peer"]["llama-server:f32"] == pytest.approx(0.5)
    assert rows[2]["kvloom_over_roofline"] == pytest.approx(0.5)  # 400 of 800

    cells = compare_report.table_cells(rows, {"hf": "transformers", "llama-server:f32": "llama-server F32"})
    assert cells[0] == ["figure", "kvloom", "transformers", "llama-server F32", "kvloom/transformers",
                        "kvloom/llama-server F32", "kvloom/roofline", "roofline"]
    assert cells[1] == ["decode tok/s @1 (in process)", "50.0", "25.0", "-", "2.00x", "-", "50.0%", "100.0"]
    assert cells[2][2:6] == ["-", "80.0", "-", "0.50x"]
    lines = format_table(cells)
    assert len({len(line) for line in lines}) == 1  # right-aligned columns end together
    assert lines[1].startswith("decode tok/s @1 (in process)  ")
    assert lines[1].split()[-2:] == ["50.0%", "100.0"]


def test_report_lines_one_table_per_mode_and_the_skipped_peers():
    roof = Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000)
    peers = ["llamacpp:f32", "llama-server:f16"]
    measurements = {"kvloom": {"prefill": {"value": 10.0}}, "kvloom-http": {"prefill": {"value": 8.0}},
                    "llama-server:f16": {"prefill": {"value": 4.0}}}
    report = dict(model="m", num_parameters=50_000_000, cpu_count=2, roofline=roof.to_json(),
                  rows=compare_report.build_rows(compare_report.figures(compare_workloads.QUICK, ["prefill"],
                                                                        roof), measurements, peers),
                  peers={"llamacpp:f32": dict(label="llama.cpp F32", mode="in process", status="skipped",
                                              message="llama-cpp-python is not installed"),
                         "llama-server:f16": dict(label="llama-server F16", mode="HTTP", status="ok",
                                                  message=None)})
    lines = compare_report.report_lines(report)
    assert "skipped: llama.cpp F32: llama-cpp-python is not installed" in lines
    headers = [i for i, line in enumerate(lines) if line.startswith("figure")]
    assert len(headers) == 2  # in process, then HTTP
    local, http = lines[headers[0]:headers[0] + 2], lines[headers[1]:headers[1] + 2]
    assert "llama" not in local[0]  # a skipped peer gets no column; an HTTP peer none in process
    assert local[1].startswith("prefill tok/s (128-tok prompt) (in process)")
    assert "kvloom/llama-server F16" in http[0] and http[1].split()[-4:-2] == ["4.0", "2.00x"]
    assert any(line.startswith("note: llama-server") for line in lines)
    assert any(line.startswith("note: an F16 peer") for line in lines)


def test_peer_labels_and_modes():
    assert compare_report.peer_label("llama-server:f16") == "llama-server F16"
    assert compare_report.peer_label("llamacpp:original", "(Q4_1)") == "llama.cpp (Q4_1)"
    assert compare_report.peer_label("hf") == "transformers"
    assert compare_report.peer_mode("llama-server:f32") == "HTTP"
    assert compare_report.peer_mode("llamacpp:f16") == compare_report.peer_mode("hf") == "in process"


def test_a_bfloat16_run_says_so_against_its_float32_peers():
    roof = Roofline(peak_flops=100e9, bandwidth=20e9, num_parameters=50_000_000, bytes_per_parameter=2)
    measurements = {"kvloom": {"prefill": {"value": 10.0}}, "hf": {"prefill": {"value": 5.0}}}
    report = dict(model="m", num_parameters=50_000_000, cpu_count=2, roofline=roof.to_json(),
                  dtype="bfloat16",
                  rows=compare_report.build_rows(compare_report.figures(compare_workloads.QUICK, ["prefill"],
                                                                        roof), measurements, ["hf"]),
                  peers={"hf": dict(label="transformers", mode="in process", status="ok", message=None)})
    lines = compare_report.report_lines(report)
    assert lines[0] == "kvloom compare: m (50.0M params, kvloom bfloat16, 2 CPUs)"
    note = "note: kvloom runs bfloat16 weights against float32 transformers; the roofline is bfloat16's"
    assert note in lines
    assert lines[1].startswith("machine: bfloat16 matmul peak 100.0 GFLOP/s")
    assert lines[2].endswith("decode at batch B also <= B x 200.0 tok/s (bandwidth / params x 2 B)")
