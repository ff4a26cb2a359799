"""kvloom as `kvloom compare` measures it, in process and over HTTP (compare_workloads.System each).

    KvloomEngineSystem  a started Engine: batches submitted at once (tools.bench_engine.run_batch),
                        first tokens and score calls timed one at a time
    HttpSystem          any OpenAI-compatible server (kvloom's on loopback, llama.cpp's): each figure
                        is one `kvloom bench` wave of the same prompts as text (a client process of
                        its own, its printout swallowed, its JSON summary read); scoring only where the
                        server has kvloom's /v1/score
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

from kvloom.tools.compare_workloads import InProcessSystem, PromptSet, Sizes, System, log, measured


class KvloomEngineSystem(InProcessSystem):
    name = "kvloom"

    def __init__(self, engine, sizes: Sizes):
        self.engine, self.sizes = engine, sizes

    async def warm_up(self, prompts: PromptSet) -> None:
        from kvloom.tools.bench_engine import run_batch

        await run_batch(self.engine, prompts.warmup, min(2, self.sizes.new_tokens))

    async def batch(self, prompts: list, new_tokens: int) -> dict:
        from kvloom.tools.bench_engine import run_batch

        r = await run_batch(self.engine, prompts, new_tokens)
        return measured(r["tok_s"], wall_s=r["wall_s"], num_tokens=len(prompts) * new_tokens)

    async def first_token_s(self, prompt: list[int]) -> float:
        from kvloom.tools.bench_engine import time_to_first_token

        return (await time_to_first_token(self.engine, prompt))[0]

    async def score_s(self, query: list[int], items: list[list[int]], label_ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        await self.engine.score(query, items, list(label_ids))
        return time.perf_counter() - t0


async def run_bench_quietly(options: Sequence[str]) -> dict:
    """`kvloom bench` as a client process of its own, its printout swallowed; its JSON summary. A process
    apart, as a real client is: kvloom's server (in this process) and llama-server alike are measured
    without the client's work on their event loop."""
    with tempfile.TemporaryDirectory(prefix="kvloom-compare-") as tmp:
        path = os.path.join(tmp, "summary.json")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvloom.tools.cli", "bench", *options, "--json", path, "--no-progress",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await proc.communicate()
        if proc.returncode == 2 or not os.path.isfile(path):
            raise RuntimeError(f"kvloom bench {' '.join(options)}: exit code {proc.returncode}: "
                               f"{stderr.decode(errors='replace')[-800:]}")
        with open(path) as f:
            return json.load(f)


def _from_summary(summary: dict, value: Optional[float]) -> dict:
    """A figure from a bench summary; None when any request failed (the errors are kept)."""
    if summary["num_errors"]:
        log(f"{summary['num_errors']} of {summary['num_requests']} requests failed: {summary['errors']}")
        value = None
    return measured(value, duration_s=summary["duration_s"], output_tokens=summary["output_tokens"],
                    input_tokens=summary["input_tokens"], errors=summary["errors"],
                    ttft_p50_ms=summary["ttft_ms"]["p50"], e2e_p50_ms=summary["e2e_ms"]["p50"])


class HttpSystem(System):
    """An OpenAI-compatible server at `url`; `score_vocab_size` given: it serves kvloom's /v1/score."""

    def __init__(self, name: str, url: str, sizes: Sizes, extra_body: dict, timeout_s: float,
                 score_vocab_size: Optional[int] = None):
        self.name, self.url, self.sizes = name, url, sizes
        self.extra_body, self.timeout_s, self.score_vocab_size = extra_body, timeout_s, score_vocab_size
        self.can_score = score_vocab_size is not None

    async def _wave(self, texts: Sequence[str], max_tokens: int, concurrency: int) -> dict:
        """len(texts) requests of the given prompts, `concurrency` in flight: the bench summary."""
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", prefix="kvloom-compare-", delete=False) as f:
            for text in texts:
                f.write(json.dumps({"prompt": text, "max_tokens": max_tokens}) + "\n")
        try:
            return await run_bench_quietly([
                "--url", self.url, "--prompts-file", f.name, "--concurrency", str(concurrency),
                "--num-requests", str(len(texts)), "--warmup-requests", "0", "--timeout", str(self.timeout_s),
                "--extra-body", json.dumps(self.extra_body)])
        finally:
            os.unlink(f.name)

    async def warm_up(self, prompts: PromptSet) -> None:
        await self._wave(prompts.warmup[:1], 2, 1)

    async def batch(self, prompts: list, new_tokens: int) -> dict:
        """All at once; the figure counts the tokens the server says it generated, and says when they
        are not the number asked for (a server that ignores ignore_eos stops early)."""
        s = await self._wave(prompts, new_tokens, len(prompts))
        requested = len(prompts) * new_tokens
        if not s["num_errors"] and s["output_tokens"] != requested:
            log(f"{self.name}: {s['output_tokens']} tokens generated of {requested} asked for")
        return dict(_from_summary(s, s["output_throughput"]), requested_tokens=requested)

    async def prefill(self, prompts: list, num_tokens: int) -> dict:
        s = await self._wave(prompts, 1, 1)
        ttft_ms = s["ttft_ms"]["p50"]
        return _from_summary(s, num_tokens / (ttft_ms / 1e3) if ttft_ms else None)

    async def score(self, sets: list, label_ids: Sequence[int], num_items: int) -> dict:
        """`kvloom bench --workload score` with the run's sizes and labels (its own random ids)."""
        sizes = self.sizes
        s = await run_bench_quietly([
            "--url", self.url, "--workload", "score", "--query-tokens", str(sizes.query_tokens),
            "--num-items", str(num_items), "--item-tokens", str(sizes.item_tokens),
            "--label-token-ids", ",".join(str(i) for i in label_ids),
            "--vocab-size", str(self.score_vocab_size), "--num-requests", str(sizes.repeats),
            "--warmup-requests", "1", "--timeout", str(self.timeout_s)])
        return _from_summary(s, s["items_per_s"])
