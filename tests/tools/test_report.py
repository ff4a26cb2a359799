"""tools.report: the helpers every measuring tool prints and writes its figures with."""

import json

import pytest

from kvloom.tools import report

pytestmark = pytest.mark.timeout(30)


def test_values_and_ratios():
    assert report.format_value(12.345) == "12.35" and report.format_value(None) == "-"
    assert report.format_value(2.0, ".1f", "x") == "2.0x" and report.format_ms(3.14159) == "3.1"
    assert report.ratio(6.0, 2.0) == 3.0
    assert report.ratio(6.0, None) is None and report.ratio(None, 2.0) is None and report.ratio(1.0,
                                                                                                0.0) is None


def test_format_table_aligns_columns():
    cells = [["figure", "a", "b"], ["decode", "1.0", "12.50"], ["x", "-", "3"]]
    assert report.format_table(cells) == ["figure    a      b", "decode  1.0  12.50", "x         -      3"]
    assert report.format_table(cells, num_left=3) == ["figure  a    b", "decode  1.0  12.50",
                                                      "x       -    3"]


def test_publish_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert report.publish({"k": 1}, lambda r: print("figures", r["k"]), str(path), "tool") == {"k": 1}
    assert json.loads(path.read_text()) == {"k": 1}
    captured = capsys.readouterr()
    assert captured.out == "figures 1\n" and f"tool: wrote {path}" in captured.err
    report.write_json(None, {"k": 2})  # no path: nothing written, no error
