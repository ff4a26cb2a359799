"""What `kvloom compare` runs on every system: the sizes, the prompts, and the one measuring loop.

    Sizes (FULL, QUICK, sizes_from_args)     how big each workload is
    build_prompt_set(encode, rng, sizes)     every prompt of a run as token ids of random common words
        (as_text: the same prompts as text, for servers that take text)
    measure_system(system, prompts, sizes, workloads) -> {figure key: measured(value, ...)}
        the same figures for every system, from four calls a System answers:
          warm_up(prompts); batch(prompts, new_tokens) (all submitted at once, or in turn where the
          system runs one sequence at a time); prefill(prompts, num_tokens); score(sets, labels, n)
    InProcessSystem: the prefill and score figures (medians of single calls, after a warm-up call)
        for systems that time one first token and one score call themselves

Figures (higher is better; every figure includes its prefill):
  decode@C       C prompts at once, new_tokens each: generated tokens / wall time
  prefill        one fresh prompt at a time, max_tokens=1: prompt tokens / time to first token
  shared-prefix  requests of one shared prefix + own tokens, at once: generated tokens / wall time
  score          a query and items: items / time
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from kvloom.tools import report
from kvloom.tools.report import format_value
from kvloom.tools.workload import WORDS


@dataclass(frozen=True)
class Sizes:
    concurrency: tuple[int, ...]
    prompt_tokens: int  # decode prompts
    new_tokens: int  # decode
    prefill_tokens: int
    prefix_tokens: int  # shared-prefix: the common head
    unique_tokens: int  # shared-prefix: each request's own tail
    num_shared_requests: int
    shared_new_tokens: int
    query_tokens: int
    num_items: int
    item_tokens: int
    repeats: int  # prefill prompts and score calls (medians reported)
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    copy_mib: int  # bandwidth probe buffer

    @property
    def max_context(self) -> int:
        """The longest sequence any workload builds."""
        return max(self.prompt_tokens + self.new_tokens, self.prefill_tokens + 1,
                   self.prefix_tokens + self.unique_tokens + self.shared_new_tokens,
                   self.query_tokens + self.item_tokens + 1)


FULL = Sizes(concurrency=(1, 8, 32), prompt_tokens=32, new_tokens=128, prefill_tokens=512, prefix_tokens=400,
             unique_tokens=32, num_shared_requests=16, shared_new_tokens=32, query_tokens=128, num_items=16,
             item_tokens=16, repeats=3, matmul_sizes=(2048, 3072), matmul_repeats=5, copy_mib=256)
QUICK = Sizes(concurrency=(1, 4), prompt_tokens=16, new_tokens=16, prefill_tokens=128, prefix_tokens=48,
              unique_tokens=16, num_shared_requests=4, shared_new_tokens=8, query_tokens=32, num_items=4,
              item_tokens=8, repeats=2, matmul_sizes=(256, 512), matmul_repeats=2, copy_mib=16)


def sizes_from_args(args) -> Sizes:
    sizes = QUICK if args.quick else FULL
    names = ("concurrency", "new_tokens", "prompt_tokens", "prefill_tokens", "repeats")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "concurrency" in given:
        given["concurrency"] = tuple(given["concurrency"])
    return dataclasses.replace(sizes, **given)


@dataclass(frozen=True)
class PromptSet:
    """Every prompt of one run, as token ids (in process) or as text (HTTP): the same shapes."""

    warmup: list  # max(concurrency) decode-sized prompts
    decode: dict  # concurrency -> prompts
    prefill: list  # one fresh prompt per repeat
    shared: list  # shared prefix ++ own tokens, one per request
    score: list  # (query, items) per repeat; the first extra one warms up
    label_ids: tuple[int, ...]


Encode = Callable[[str], list[int]]


def random_token_ids(encode: Encode, rng: np.random.Generator, num_tokens: int) -> list[int]:
    """num_tokens ids of random common words: text a tokenizer reads back to about the same ids."""
    ids: list[int] = []
    while len(ids) < num_tokens:
        words = rng.choice(WORDS, size=max(8, num_tokens - len(ids)))
        ids += encode(" " + " ".join(words))
    return ids[:num_tokens]


def label_token_ids(encode: Encode) -> tuple[int, ...]:
    labels = tuple(dict.fromkeys(encode(text)[-1] for text in (" yes", " no")))
    return labels if len(labels) == 2 else tuple(encode(" yes no")[:2])


def build_prompt_set(encode: Encode, rng: np.random.Generator, sizes: Sizes) -> PromptSet:
    def many(count: int, num_tokens: int) -> list[list[int]]:
        return [random_token_ids(encode, rng, num_tokens) for _ in range(count)]

    prefix = random_token_ids(encode, rng, sizes.prefix_tokens)
    return PromptSet(
        warmup=many(max(sizes.concurrency), sizes.prompt_tokens),
        decode={c: many(c, sizes.prompt_tokens) for c in sizes.concurrency},
        prefill=many(sizes.repeats, sizes.prefill_tokens),
        shared=[prefix + own for own in many(sizes.num_shared_requests, sizes.unique_tokens)],
        score=[(random_token_ids(encode, rng, sizes.query_tokens), many(sizes.num_items, sizes.item_tokens))
               for _ in range(sizes.repeats + 1)],
        label_ids=label_token_ids(encode),
    )


def as_text(prompts: PromptSet, decode: Callable[[list[int]], str]) -> PromptSet:
    """The same prompts as text (the score set stays ids: HTTP scoring is kvloom's own endpoint)."""
    return dataclasses.replace(
        prompts, warmup=[decode(p) for p in prompts.warmup],
        decode={c: [decode(p) for p in ps] for c, ps in prompts.decode.items()},
        prefill=[decode(p) for p in prompts.prefill], shared=[decode(p) for p in prompts.shared])


def measured(value: Optional[float], **detail) -> dict:
    return {"value": value, **detail}


class System:
    """One system under measurement; `name` labels its log lines, `can_score` says whether it scores."""

    name = "system"
    can_score = True

    async def warm_up(self, prompts: PromptSet) -> None:
        """Untimed work before the first figure."""

    async def batch(self, prompts: list, new_tokens: int) -> dict:
        raise NotImplementedError

    async def prefill(self, prompts: list, num_tokens: int) -> dict:
        raise NotImplementedError

    async def score(self, sets: list, label_ids: Sequence[int], num_items: int) -> dict:
        raise NotImplementedError


class InProcessSystem(System):
    """A system in this process, timing one first token and one score call (blocking calls are fine
    here: nothing else runs on the loop while a peer is measured)."""

    async def first_token_s(self, prompt: list[int]) -> float:
        raise NotImplementedError

    async def score_s(self, query: list[int], items: list[list[int]], label_ids: Sequence[int]) -> float:
        raise NotImplementedError

    async def prefill(self, prompts: list, num_tokens: int) -> dict:
        ttfts = [await self.first_token_s(p) for p in prompts]
        ttft = statistics.median(ttfts)
        return measured(num_tokens / ttft, ttft_s=ttft, ttfts_s=ttfts)

    async def score(self, sets: list, label_ids: Sequence[int], num_items: int) -> dict:
        (query, items), *timed = sets
        await self.score_s(query, items, label_ids)  # warm-up
        times = [await self.score_s(q, i, label_ids) for q, i in timed]
        return measured(num_items / statistics.median(times), times_s=times)


async def measure_system(system: System, prompts: PromptSet, sizes: Sizes, workloads: Sequence[str]) -> dict:
    """The figures of `workloads` on one system, in a fixed order: {key: measured(value, ...)}."""
    await system.warm_up(prompts)
    out = {}
    if "decode" in workloads:
        for c in sizes.concurrency:
            out[f"decode@{c}"] = await system.batch(prompts.decode[c], sizes.new_tokens)
    if "prefill" in workloads:
        out["prefill"] = await system.prefill(prompts.prefill, sizes.prefill_tokens)
    if "shared-prefix" in workloads:
        out["shared-prefix"] = await system.batch(prompts.shared, sizes.shared_new_tokens)
    if "score" in workloads and system.can_score:
        out["score"] = await system.score(prompts.score, prompts.label_ids, sizes.num_items)
    for key, m in out.items():
        log(f"{system.name} {key}: {format_value(m['value'], '.1f')}")
    return out


def log(message: str) -> None:
    report.log("compare", message)
