"""Per-engine Prometheus metrics, on the engine's own registry (never the process-global one).

Where a metric means what a vLLM metric means, it has vLLM's name and labels (`vllm:` prefix, a
`model_name` label holding the served model name), so dashboards and alerts built for vLLM read a
kvloom server unchanged; `tools/grafana_dashboard.json` is one. kvloom's own metrics (`kvloom_*`)
sit beside them, with the same `model_name` label.

The engine records through the attributes of `EngineMetrics` (`metrics.generation_tokens.inc(n)`);
each fills in the model name at the time of use, since the model's name is known only once it is
loaded.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MODEL_LABEL = "model_name"

# Names that other programs read back from /metrics (the router's rate estimates, tools.bench_router):
# one definition each, so a rename reaches the readers.
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
# A replica's prefill throughput, free of queueing: prompt tokens computed by steps, and those steps' seconds
# (a mixed step's time split by its share of prefill tokens). The router's prefill rate is their ratio.
PREFILL_TOKENS = "kvloom_prefill_tokens"
PREFILL_SECONDS = "kvloom_prefill_seconds"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

# Read from the engine at scrape time: (name, type, help, key in the engine's live dict).
LIVE_METRICS = (
    ("vllm:num_requests_running", "gauge", "Requests being computed.", "num_requests_running"),
    ("vllm:num_requests_waiting", "gauge", "Requests queued for admission.", "num_requests_waiting"),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV cache pages in use (1 means 100 percent).",
     "kv_cache_usage_ratio"),
    (PREFIX_CACHE_QUERIES, "counter", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries"),
    (PREFIX_CACHE_HITS, "counter", "Prompt tokens served from the prefix cache.", "prefix_cache_hits"),
    ("vllm:num_preemptions", "counter", "Requests preempted for lack of KV cache pages.", "num_preemptions"),
    ("vllm:spec_decode_num_drafts", "counter", "Verify rows: a request's drafts checked by one step.",
     "spec_decode_num_drafts"),
    ("vllm:spec_decode_num_draft_tokens", "counter", "Draft tokens proposed (speculative decoding).",
     "spec_decode_num_draft_tokens"),
    ("vllm:spec_decode_num_accepted_tokens", "counter", "Draft tokens the model confirmed.",
     "spec_decode_num_accepted_tokens"),
    ("kvloom_engine_ready", "gauge", "1 when the engine is READY.", "engine_ready"),
)


class _LiveCollector:
    def __init__(self, read: Callable[[], dict], model_name: Callable[[], str]):
        self._read, self._model_name = read, model_name

    def collect(self):
        values, name = self._read(), self._model_name()
        for metric, kind, doc, key in LIVE_METRICS:
            family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_type(metric, doc, labels=[MODEL_LABEL])
            family.add_metric([name], values[key])
            yield family


class _ForModel:
    """A metric whose first label is the model name, filled in at each use: `inc()` and `observe()` for
    one without further labels, `labels(...)` for the others."""

    def __init__(self, metric, model_name: Callable[[], str]):
        self._metric, self._model_name = metric, model_name

    def labels(self, *values):
        return self._metric.labels(self._model_name(), *values)

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class EngineMetrics:
    def __init__(self, read_live: Callable[[], dict], model_name: Callable[[], str] = lambda: "default"):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, [MODEL_LABEL]

        def histogram(name, doc):
            return _ForModel(Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r), model_name)

        def counter(name, doc, *more_labels):
            return _ForModel(Counter(name, doc, labels + list(more_labels), registry=r), model_name)

        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds", "Arrival to first token.")
        self.inter_token_latency = histogram(INTER_TOKEN_LATENCY,
                                             "Time between tokens of a request.")
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.requests_finished = counter("vllm:request_success", "Finished requests by finish reason.",
                                         "finished_reason")
        self.request_errors = counter("kvloom_request_errors", "Failed requests by error type.", "error_type")
        self.steps = counter("kvloom_steps", "Engine steps run.")
        self.prefill_tokens = counter(PREFILL_TOKENS, "Prompt tokens computed by engine steps.")
        self.prefill_seconds = counter(PREFILL_SECONDS, "Seconds of engine steps spent on prefill chunks (a "
                                       "step's time times its share of prefill tokens).")
        self.score_steps = counter("kvloom_score_steps", "Score steps run, by scoring mode.", "mode")
        self.score_rows = counter("kvloom_score_rows", "Rows of score steps, by scoring mode.", "mode")
        self.score_items = counter("kvloom_score_items", "Items scored by score steps, by scoring mode.",
                                   "mode")
        r.register(_LiveCollector(read_live, model_name))

    def record_step(self, num_prefill_tokens: int, num_tokens: int, seconds: float) -> None:
        """A step of num_tokens tokens, num_prefill_tokens of them prompt chunks, that took `seconds`."""
        self.steps.inc()
        if num_prefill_tokens:
            self.prefill_tokens.inc(num_prefill_tokens)
            self.prefill_seconds.inc(seconds * num_prefill_tokens / num_tokens)

    def record_score_step(self, mode: str, num_rows: int, num_items: int) -> None:
        self.score_steps.labels(mode).inc()
        self.score_rows.labels(mode).inc(num_rows)
        self.score_items.labels(mode).inc(num_items)

    def render(self) -> bytes:
        return generate_latest(self.registry)
