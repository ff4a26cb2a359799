"""Per-engine Prometheus metrics, on the engine's own registry (never the process-global one)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class _LiveCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, read: Callable[[], dict]):
        self._read = read

    def collect(self):
        v = self._read()
        for name, doc in (("num_requests_running", "Requests being computed."),
                          ("num_requests_waiting", "Requests queued for admission."),
                          ("kv_cache_usage_ratio", "Fraction of KV pages in use."),
                          ("engine_ready", "1 when the engine is READY.")):
            yield GaugeMetricFamily(f"kvloom_{name}", doc, value=v[name])
        for name, doc in (("prefix_cache_hits", "Prompt tokens served from the prefix cache."),
                          ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                          ("num_preemptions", "Requests preempted for lack of KV pages.")):
            yield CounterMetricFamily(f"kvloom_{name}", doc, value=v[name])


class EngineMetrics:
    def __init__(self, read_live: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "kvloom_time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "kvloom_inter_token_latency_seconds", "Time between tokens of a request.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "kvloom_e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvloom_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("kvloom_generation_tokens", "Generated tokens.", registry=r)
        self.requests_finished = Counter(
            "kvloom_requests_finished", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.request_errors = Counter(
            "kvloom_request_errors", "Failed requests by error type.", ["error_type"], registry=r)
        self.steps = Counter("kvloom_steps", "Engine steps run.", registry=r)
        self.score_steps = Counter("kvloom_score_steps", "Score steps run, by scoring mode.", ["mode"], registry=r)
        self.score_rows = Counter("kvloom_score_rows", "Rows of score steps, by scoring mode.", ["mode"], registry=r)
        self.score_items = Counter("kvloom_score_items", "Items scored by score steps, by scoring mode.", ["mode"],
                                   registry=r)
        r.register(_LiveCollector(read_live))

    def record_score_step(self, mode: str, num_rows: int, num_items: int) -> None:
        self.score_steps.labels(mode).inc()
        self.score_rows.labels(mode).inc(num_rows)
        self.score_items.labels(mode).inc(num_items)

    def render(self) -> bytes:
        return generate_latest(self.registry)
