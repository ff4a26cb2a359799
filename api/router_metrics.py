"""The router's Prometheus metrics, on the router's own registry (never the process-global one)."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kvloom.api.router_membership import Replica, ReplicaState

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _StateCollector:
    def __init__(self, replicas: Callable[[], Iterable[Replica]]):
        self._replicas = replicas

    def collect(self):
        family = GaugeMetricFamily("kvloom_router_replica_state", "1 for the state each replica is in.",
                                   labels=["replica", "state"])
        in_flight = GaugeMetricFamily("kvloom_router_replica_in_flight", "Requests in flight per replica.",
                                      labels=["replica"])
        for replica in self._replicas():
            for state in ReplicaState:
                family.add_metric([replica.url, state.value], 1.0 if replica.state is state else 0.0)
            in_flight.add_metric([replica.url], replica.num_in_flight)
        yield family
        yield in_flight


class RouterMetrics:
    def __init__(self, replicas: Callable[[], Iterable[Replica]]):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.selections = Counter("kvloom_router_selections", "Requests sent per replica.", ["replica"],
                                  registry=r)
        self.predicted_cached_tokens = Counter(
            "kvloom_router_predicted_cached_tokens", "Cached prompt tokens the router predicted.",
            ["replica"], registry=r)
        self.actual_cached_tokens = Counter(
            "kvloom_router_actual_cached_tokens", "Cached prompt tokens the replica reported in usage.",
            ["replica"], registry=r)
        self.retries = Counter("kvloom_router_retries", "Requests retried on another replica.", ["reason"],
                               registry=r)
        self.errors = Counter("kvloom_router_errors", "Requests the router ended with an error.", ["code"],
                              registry=r)
        self.decision_seconds = Histogram("kvloom_router_decision_seconds", "Time to rank the replicas.",
                                          buckets=DECISION_BUCKETS, registry=r)
        r.register(_StateCollector(replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)
