"""Speculative decoding on the real runner: tiny random-weight models of each family fall into loops, so
prompt lookup finds drafts that come true, and greedy output with `--speculative ngram` is token for token
the output without it (stop strings, max_tokens, a prompt served from pages that verify steps wrote), with
every verify shape compiled by warm-up."""

import asyncio

import numpy as np
import pytest

from kvloom.engine.config import SpeculativeConfig
from kvloom.engine.engine import Engine
from kvloom.engine.request import SamplingParams
from tests import tiny_models
from tests.conftest import tiny_engine_config
from tests.engine.test_speculative import latest_first_substring, outputs

pytestmark = pytest.mark.timeout(300)

RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(3, tiny_models.VOCAB_SIZE, n).tolist() for n in (6, 19, 45)]
GREEDY = dict(temperature=0.0, ignore_eos=True)


async def run_cases(engine, cases):
    return await asyncio.gather(*[outputs(engine, prompt, SamplingParams(**params))
                                  for prompt, params in cases])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
async def test_greedy_output_is_the_same_with_and_without_speculation(tiny_checkpoints, family):
    model = tiny_checkpoints(family)
    base = [(p, dict(GREEDY, max_tokens=48)) for p in PROMPTS] + [(PROMPTS[0], dict(max_tokens=30,
                                                                                      temperature=0.0))]
    async with Engine(tiny_engine_config(model)) as plain:
        expected = await run_cases(plain, base)
        texts = [r["text"] for r in expected[:len(PROMPTS)]]
        # stop strings that let the generation run longest, and lengths that end mid verify step
        later = [(p, dict(GREEDY, max_tokens=48, stop=[latest_first_substring(t, 2)]))
                 for p, t in zip(PROMPTS, texts) if len(t) > 2]
        later += [(p, dict(GREEDY, max_tokens=m)) for p, m in zip(PROMPTS, (7, 13, 22))]
        # the first sequence again, as a prompt: with speculation, its pages come from the prefix cache
        later += [(PROMPTS[1] + expected[1]["ids"], dict(GREEDY, max_tokens=16))]
        expected += await run_cases(plain, later)

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    async with Engine(tiny_engine_config(model, speculative=spec)) as engine:
        got = await run_cases(engine, base)
        got += await run_cases(engine, later)
        stats = engine.spec_stats
        assert engine.runner.num_compiled == engine.num_compiled_at_ready  # verify shapes came with warm-up
        assert got[-1]["usage"].cached_tokens > len(PROMPTS[1])

    for case, want, have in zip(base + later, expected, got):
        for key in ("ids", "text", "finish", "usage"):
            assert have[key] == want[key], (family, case, key)
    assert stats.num_accepted_tokens > 0, stats  # speculation ran: drafts came true
    assert any(r["deltas"] < len(r["ids"]) for r in got)
