"""Where a request goes: every ready replica ranked, best first (the proxy retries on the next).

`prefix` ranks by one cost in seconds, the predicted time to first token on that replica:

    cost = (uncached prompt tokens + tokens already queued there) / its prefill rate
           + requests decoding there * its inter-token latency * decode_share

Queued tokens count from the moment the router sends (see router_proxy), not from the first
streamed byte. Ties (costs equal to the microsecond) go to more cached tokens, then fewer
requests in flight, then a draw from the router's own seeded RNG, made for the candidates in
registration order, so a decision never depends on hash-map order or process-global state.
`least_load` ranks by the same queue terms without the cache; `round_robin` rotates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from kvloom.api.router_index import PromptPages
from kvloom.api.router_membership import Replica

POLICIES = ("prefix", "least_load", "round_robin")


@dataclass(frozen=True)
class CostConfig:
    default_prefill_tokens_per_s: float = 4000.0  # until a replica's own rate is measured
    default_inter_token_s: float = 0.02
    decode_share: float = 0.5  # how much of a decoding request's step time delays a new prefill


@dataclass(frozen=True)
class Candidate:
    replica: Replica
    num_cached_tokens: int  # predicted
    cost_s: float


class Policy:
    def __init__(self, name: str, seed: int, cost: CostConfig = CostConfig()):
        if name not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {name!r}")
        self.name, self.cost = name, cost
        self.rng = random.Random(seed)
        self._next_turn = 0

    def rank(self, replicas: Sequence[Replica], prompt: Optional[PromptPages],
             num_cached: Callable[[Replica, PromptPages], int]) -> list[Candidate]:
        """`replicas` in registration order, all routable; returns them best first."""
        if not replicas:
            return []
        num_prompt = prompt.num_tokens if prompt is not None else 0
        candidates = []
        for replica in replicas:
            cached = num_cached(replica, prompt) if prompt is not None and self.name == "prefix" else 0
            candidates.append(Candidate(replica, cached, self._cost(replica, num_prompt - cached)))
        if self.name == "round_robin":
            turn = self._next_turn % len(candidates)
            self._next_turn += 1
            return candidates[turn:] + candidates[:turn]
        draws = [self.rng.random() for _ in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (
            round(candidates[i].cost_s, 6), -candidates[i].num_cached_tokens,
            candidates[i].replica.num_in_flight, draws[i]))
        return [candidates[i] for i in order]

    def _cost(self, replica: Replica, num_uncached: int) -> float:
        rate = replica.prefill_tokens_per_s or self.cost.default_prefill_tokens_per_s
        inter_token_s = replica.inter_token_s or self.cost.default_inter_token_s
        return ((max(0, num_uncached) + replica.num_queued_tokens) / rate
                + replica.num_decoding * inter_token_s * self.cost.decode_share)
