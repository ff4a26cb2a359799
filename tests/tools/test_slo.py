"""tools.slo: percentiles, SLO parsing and verdicts, and summaries, on synthetic timings."""

import numpy as np
import pytest

from kvloom.tools.slo import (RequestRecord, build_summary, evaluate_slo, metric_samples, parse_slos,
                              percentile,
                       stat, summarize_ms)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(n, q):
    values = np.random.default_rng(n).exponential(0.1, size=n).tolist()
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)
    assert stat([1.0, 2.0, 6.0], "mean") == 3.0
    assert stat([1.0, 2.0, 6.0], "p50") == 2.0
    assert stat([], "p99") is None
    with pytest.raises(ValueError, match="unknown statistic"):
        stat([1.0], "median")


def test_summarize_ms_reports_milliseconds():
    s = summarize_ms([0.001 * v for v in range(1, 101)])
    assert s["count"] == 100
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(np.percentile(range(1, 101), 50))
    assert s["p90"] == pytest.approx(np.percentile(range(1, 101), 90))
    assert s["p99"] == pytest.approx(np.percentile(range(1, 101), 99))
    assert summarize_ms([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def test_parse_slos_with_units():
    spec = "ttft_p99=500ms, e2e_p99=6.5s,itl_p50=50ms,error_rate=1%,tpot_mean=2500us,e2e_p99.9=1e1s"
    slos = parse_slos(spec)
    by_name = {s.name: s for s in slos}
    assert [s.name for s in slos] == [item.split("=")[0].strip() for item in spec.split(",")]
    assert by_name["ttft_p99"].metric == "ttft" and by_name["ttft_p99"].stat == "p99"
    assert by_name["ttft_p99"].threshold == pytest.approx(0.5) and by_name["ttft_p99"].text == "500ms"
    assert by_name["e2e_p99"].threshold == pytest.approx(6.5)
    assert by_name["itl_p50"].threshold == pytest.approx(0.05)
    assert by_name["tpot_mean"].threshold == pytest.approx(0.0025) and by_name["tpot_mean"].stat == "mean"
    assert by_name["e2e_p99.9"].threshold == pytest.approx(10.0)
    assert by_name["error_rate"].threshold == pytest.approx(0.01) and not by_name["error_rate"].is_latency
    assert parse_slos("error_rate=0.05")[0].threshold == pytest.approx(0.05)  # a bare fraction
    assert parse_slos("error_rate=0%")[0].threshold == 0.0


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("ttft_p99", "expected NAME=VALUE"),
    ("ttft_p99=", "expected NAME=VALUE"),
    ("ttft_p99=500", "a unit is required"),
    ("ttft_p99=500min", "is not a duration"),
    ("ttft_p99=-5ms", "is not a duration"),
    ("latency_p99=5ms", "unknown metric"),
    ("ttft_median=5ms", "unknown metric"),
    ("ttft_p101=5ms", r"\[0, 100\]"),
    ("error_rate=5", "write percentages with %"),
    ("error_rate=150%", "more than 100%"),
    ("error_rate=lots", "not a rate"),
    ("ttft_p99=1s,ttft_p99=2s", "given twice"),
    ("ttft_p99=1s,,e2e_p99=2s", "empty entry"),
])
def test_bad_slo_specs_raise_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_slos(spec)


def _records():
    """10 completed requests (ttft 10..100 ms, 5 tokens each, 4 gaps of 20 ms) and 2 failed ones."""
    records = [RequestRecord(ttft=0.01 * i, e2e=0.01 * i + 0.08, itls=[0.02] * 4, output_tokens=5,
                             prompt_tokens=7) for i in range(1, 11)]
    records.append(RequestRecord(error="http_503:engine_unavailable"))
    records.append(RequestRecord(error="timeout"))
    return records


def test_metric_samples_use_completed_requests():
    records = _records()
    assert metric_samples(records, "ttft") == pytest.approx([0.01 * i for i in range(1, 11)])
    assert metric_samples(records, "tpot") == pytest.approx([0.02] * 10)  # (e2e - ttft) / (5 - 1)
    assert len(metric_samples(records, "itl")) == 40
    assert RequestRecord(ttft=0.1, e2e=0.2, output_tokens=1).tpot is None


def test_slo_pass_fail_and_violation_rates():
    records = _records()
    ttft_p50, ttft_p99, itl, error_rate, e2e_mean = parse_slos(
        "ttft_p50=60ms,ttft_p99=50ms,itl_p99=20ms,error_rate=10%,e2e_mean=200ms")
    r = evaluate_slo(ttft_p50, records)
    assert r.is_passed and r.measured == pytest.approx(0.055) and r.violation_rate == pytest.approx(0.4)
    r = evaluate_slo(ttft_p99, records)
    ttfts = [0.01 * i for i in range(1, 11)]
    assert not r.is_passed and r.measured == pytest.approx(np.percentile(ttfts, 99))
    assert r.violation_rate == pytest.approx(0.5)  # 60..100 ms exceed 50 ms
    r = evaluate_slo(itl, records)
    assert r.is_passed and r.violation_rate == 0.0  # equal to the threshold passes
    r = evaluate_slo(error_rate, records)
    assert not r.is_passed and r.measured == pytest.approx(2 / 12) and r.violation_rate is None
    assert evaluate_slo(e2e_mean, records).is_passed
    # nothing completed: a latency SLO cannot pass
    failed = evaluate_slo(ttft_p50, [RequestRecord(error="timeout")])
    assert not failed.is_passed and failed.measured is None
    assert evaluate_slo(parse_slos("error_rate=0%")[0], []).is_passed


def test_summary_with_errors():
    slos = parse_slos("ttft_p99=500ms,error_rate=1%")
    s = build_summary(_records(), duration_s=2.0, slos=slos)
    assert s["num_requests"] == 12 and s["completed"] == 10 and s["num_errors"] == 2
    assert s["errors"] == {"http_503:engine_unavailable": 1, "timeout": 1}
    assert s["error_rate"] == pytest.approx(2 / 12)
    assert s["request_throughput"] == pytest.approx(5.0)
    assert s["output_tokens"] == 50 and s["output_throughput"] == pytest.approx(25.0)
    assert s["input_tokens"] == 70
    assert s["ttft_ms"]["count"] == 10 and s["ttft_ms"]["mean"] == pytest.approx(55.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(20.0) and s["itl_ms"]["count"] == 40
    assert s["items"] == 0 and s["items_per_s"] == 0.0
    ttft, errors = s["slos"]
    assert ttft == {"name": "ttft_p99", "threshold": "500ms", "unit": "ms",
                    "threshold_value": pytest.approx(500.0), "measured": pytest.approx(99.1), "passed": True,
                    "violation_rate": 0.0}
    assert errors["name"] == "error_rate" and errors["unit"] == "fraction" and not errors["passed"]
    assert s["passed"] is False


def test_summary_of_scoring_and_of_nothing():
    records = [RequestRecord(e2e=0.5, num_items=8) for _ in range(4)]
    s = build_summary(records, duration_s=2.0)
    assert s["items"] == 32 and s["items_per_s"] == pytest.approx(16.0)
    assert s["ttft_ms"]["count"] == 0 and s["e2e_ms"]["p50"] == pytest.approx(500.0)
    assert s["slos"] == [] and s["passed"] is True
    empty = build_summary([], duration_s=0.0)
    assert empty["num_requests"] == 0 and empty["request_throughput"] == 0.0 and empty["error_rate"] == 0.0


def test_goodput_counts_the_requests_within_every_latency_slo():
    records = _records()  # ttft 10..100 ms, e2e 90..180 ms, gaps of 20 ms
    slos = parse_slos("ttft_p99=50ms,e2e_p50=170ms,itl_p99=20ms,error_rate=1%")
    s = build_summary(records, duration_s=2.0, slos=slos)
    assert s["goodput"] == pytest.approx(5 / 2.0)  # ttft <= 50 ms: requests 1..5 (their e2e <= 130 ms)
    assert build_summary(records, 2.0, parse_slos("itl_p50=19ms"))["goodput"] == 0.0
    assert build_summary(records, 2.0)["goodput"] == pytest.approx(5.0)  # no SLOs: every completed request
