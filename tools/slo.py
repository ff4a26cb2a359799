"""The pure figures behind `kvloom bench`: per-request records in, percentiles, SLO verdicts and the
JSON summary out. No I/O and no clock: tests drive it with synthetic timings.

Units: records hold seconds; summaries report latencies in milliseconds; an SLO threshold is held
in seconds (latency metrics) or as a fraction (error_rate) and keeps the text it was written as.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

LATENCY_METRICS = ("ttft", "itl", "tpot", "e2e")  # per-request figures in seconds (itl: per gap)
RATE_METRICS = ("error_rate",)
SUMMARY_STATS = ("mean", "p50", "p90", "p99")

_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_LATENCY_VALUE = re.compile(rf"^({_NUMBER})\s*(us|ms|s)$")
_RATE_VALUE = re.compile(rf"^({_NUMBER})\s*(%?)$")
_STAT = re.compile(rf"^(mean|p({_NUMBER}))$")


@dataclass
class RequestRecord:
    """One request as the client saw it. `error` is None for a completed request, else its type
    ("http_501:not_implemented", "timeout", "connection_error", ...)."""

    ttft: Optional[float] = None  # s, send -> first content chunk
    e2e: Optional[float] = None  # s, send -> end of response
    itls: list[float] = field(default_factory=list)  # s, gaps between successive content chunks
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None  # from the server's usage, when it sent one
    num_items: int = 0  # scored items (score workload)
    error: Optional[str] = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---- percentiles --------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default method); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stat(values: Sequence[float], name: str) -> Optional[float]:
    """"mean" or "pNN" (e.g. p99, p99.9) of values; None for no values."""
    if not values:
        return None
    if name == "mean":
        return sum(values) / len(values)
    match = _STAT.match(name)
    if not match:
        raise ValueError(f"unknown statistic {name!r}: expected mean or pNN (e.g. p50, p99.9)")
    return percentile(values, float(match.group(2)))


def summarize_ms(values_s: Sequence[float]) -> dict:
    """{"count", "mean", "p50", "p90", "p99"} of values in seconds, reported in milliseconds."""
    out = {"count": len(values_s)}
    for name in SUMMARY_STATS:
        v = stat(values_s, name)
        out[name] = None if v is None else v * 1e3
    return out


def metric_samples(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """The samples of a latency metric over completed requests: one per request, except itl (one
    per gap between content chunks)."""
    ok = [r for r in records if r.is_ok]
    if metric == "itl":
        return [gap for r in ok for gap in r.itls]
    if metric not in LATENCY_METRICS:
        raise ValueError(f"unknown latency metric {metric!r}")
    values = (getattr(r, metric) for r in ok)
    return [v for v in values if v is not None]


# ---- SLOs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SLO:
    name: str  # as written: "ttft_p99", "error_rate"
    metric: str  # "ttft", "itl", "tpot", "e2e" or "error_rate"
    stat: Optional[str]  # "mean", "p99", ...; None for rate metrics
    threshold: float  # seconds for latency metrics, a fraction for error_rate
    text: str  # the threshold as written: "500ms"

    @property
    def is_latency(self) -> bool:
        return self.metric in LATENCY_METRICS


def _parse_one(item: str) -> SLO:
    name, sep, value = (part.strip() for part in item.partition("="))
    example = "e.g. ttft_p99=500ms"
    if not sep or not name or not value:
        raise ValueError(f"SLO {item!r}: expected NAME=VALUE, {example}")
    if name in RATE_METRICS:
        match = _RATE_VALUE.match(value)
        if not match:
            raise ValueError(f"SLO {name}: {value!r} is not a rate: write a percentage (1%) "
                             "or a fraction (0.01)")
        number, percent = float(match.group(1)), match.group(2)
        if not percent and number > 1:
            raise ValueError(f"SLO {name}: {value!r} is more than 1: write percentages with %, e.g. {value}%")
        rate = number / 100 if percent else number
        if rate > 1:
            raise ValueError(f"SLO {name}: {value!r} is more than 100%")
        return SLO(name, name, None, rate, value)
    metric, _, stat_name = name.rpartition("_")
    if metric not in LATENCY_METRICS or not _STAT.match(stat_name):
        known = ", ".join(f"{m}_<stat>" for m in LATENCY_METRICS) + ", " + ", ".join(RATE_METRICS)
        raise ValueError(f"SLO {name!r}: unknown metric: expected one of {known}, "
                         "where <stat> is mean or pNN (p50, p90, p99, p99.9)")
    if stat_name != "mean" and not 0 <= float(stat_name[1:]) <= 100:
        raise ValueError(f"SLO {name!r}: the percentile must be in [0, 100]")
    match = _LATENCY_VALUE.match(value)
    if not match:
        hint = " (a unit is required: us, ms or s)" if re.match(rf"^{_NUMBER}$", value) else ""
        raise ValueError(f"SLO {name}: {value!r} is not a duration{hint}, {example}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return SLO(name, metric, stat_name, seconds, value)


def parse_slos(spec: str) -> list[SLO]:
    """"ttft_p99=500ms,e2e_p99=6.5s,itl_p50=50ms,error_rate=1%" -> SLOs; ValueError naming the
    offending entry otherwise."""
    items = [item.strip() for item in spec.split(",")]
    if not any(items):
        raise ValueError("SLO spec is empty: expected NAME=VALUE[,NAME=VALUE...], e.g. ttft_p99=500ms")
    slos, seen = [], set()
    for item in items:
        if not item:
            raise ValueError(f"SLO spec {spec!r} has an empty entry")
        slo = _parse_one(item)
        if slo.name in seen:
            raise ValueError(f"SLO {slo.name} is given twice")
        seen.add(slo.name)
        slos.append(slo)
    return slos


@dataclass(frozen=True)
class SLOResult:
    slo: SLO
    measured: Optional[float]  # same unit as slo.threshold; None when there was nothing to measure
    is_passed: bool
    violation_rate: Optional[float]  # latency metrics: fraction of samples above the threshold

    def to_json(self) -> dict:
        scale = 1e3 if self.slo.is_latency else 1.0
        return {"name": self.slo.name, "threshold": self.slo.text,
                "unit": "ms" if self.slo.is_latency else "fraction",
                "threshold_value": self.slo.threshold * scale,
                "measured": None if self.measured is None else self.measured * scale,
                "passed": self.is_passed, "violation_rate": self.violation_rate}


def error_rate(records: Sequence[RequestRecord]) -> float:
    return sum(not r.is_ok for r in records) / len(records) if records else 0.0


def evaluate_slo(slo: SLO, records: Sequence[RequestRecord]) -> SLOResult:
    """Pass when the measured value is at most the threshold. A latency SLO with no samples (every
    request failed) fails. The violation rate counts the samples (requests; gaps for itl) whose
    own value exceeds the threshold."""
    if not slo.is_latency:
        measured = error_rate(records)
        return SLOResult(slo, measured, measured <= slo.threshold, None)
    samples = metric_samples(records, slo.metric)
    measured = stat(samples, slo.stat)
    if measured is None:
        return SLOResult(slo, None, False, None)
    violations = sum(v > slo.threshold for v in samples) / len(samples)
    return SLOResult(slo, measured, measured <= slo.threshold, violations)


def evaluate_slos(slos: Sequence[SLO], records: Sequence[RequestRecord]) -> list[SLOResult]:
    return [evaluate_slo(slo, records) for slo in slos]


def meets_latency_slos(record: RequestRecord, slos: Sequence[SLO]) -> bool:
    """A completed request whose own figures are within every latency SLO's threshold (every gap for
    itl; a figure it has none of, such as tpot of a one-token answer, does not count against it)."""
    if not record.is_ok:
        return False
    for slo in slos:
        if not slo.is_latency:
            continue
        values = record.itls if slo.metric == "itl" else [getattr(record, slo.metric)]
        if any(v is not None and v > slo.threshold for v in values):
            return False
    return True


# ---- summary ------------------------------------------------------------------------------------

def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def build_summary(records: Sequence[RequestRecord], duration_s: float, slos: Sequence[SLO] = ()) -> dict:
    """The figures of one measured run (warm-up excluded): counts, error counts by type,
    throughputs over `duration_s`, latency stats in ms, and the SLO verdicts."""
    ok = [r for r in records if r.is_ok]
    errors = Counter(r.error for r in records if not r.is_ok)
    output_tokens = sum(r.output_tokens for r in ok)
    items = sum(r.num_items for r in ok)
    results = evaluate_slos(slos, records)
    summary = {
        "num_requests": len(records),
        "completed": len(ok),
        "num_errors": sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "error_rate": error_rate(records),
        "duration_s": duration_s,
        "request_throughput": _per_second(len(ok), duration_s),
        # completed requests per second that met every latency SLO on their own (all of them without SLOs)
        "goodput": _per_second(sum(meets_latency_slos(r, slos) for r in ok), duration_s),
        "output_throughput": _per_second(output_tokens, duration_s),
        "input_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "output_tokens": output_tokens,
        "items": items,
        "items_per_s": _per_second(items, duration_s),
    }
    for metric in LATENCY_METRICS:
        summary[f"{metric}_ms"] = summarize_ms(metric_samples(records, metric))
    summary["slos"] = [r.to_json() for r in results]
    summary["passed"] = all(r.is_passed for r in results)
    return summary
