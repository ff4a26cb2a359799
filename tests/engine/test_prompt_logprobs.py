"""Prompt logprobs on the real runner (a tiny random Llama) against transformers: every prompt token's
logprob and top alternatives, for prompts spanning several chunks and steps, beside other requests, with
and without generation, through prefix-cache hits and preemption; once each, and no compiles after
warm-up."""

import asyncio

import numpy as np
import pytest
import pytest_asyncio
import torch

from kvloom.engine.engine import Engine
from kvloom.engine.request import FinishReason, SamplingParams
from tests import tiny_models
from tests.conftest import tiny_engine_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

RNG = np.random.default_rng(7)
PROMPTS = [
    RNG.integers(3, tiny_models.VOCAB_SIZE, 6).tolist(),
    RNG.integers(3, tiny_models.VOCAB_SIZE, 75).tolist(),  # three 32-token chunks
    RNG.integers(3, tiny_models.VOCAB_SIZE, 33).tolist(),
    [11],  # a single token: nothing to score
]
TOP = 5
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama):
    """prompt -> transformers' log-softmax of every position, [len, V]."""
    hf = tiny_models.load_hf(tiny_llama)
    with torch.no_grad():
        return {tuple(p): torch.log_softmax(hf(torch.tensor([p])).logits[0], -1).numpy() for p in PROMPTS}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_llama):
    async with Engine(tiny_engine_config(tiny_llama)) as engine:
        yield engine


async def run(engine, prompt, params):
    return [out async for out in engine.generate(prompt, params)]


def prompt_logprobs_of(outs):
    """The prompt logprobs of a request's outputs; they must come exactly once."""
    given = [out.prompt_logprobs for out in outs if out.prompt_logprobs is not None]
    assert len(given) == 1, f"prompt logprobs came {len(given)} times"
    return given[0]


def assert_matches(prompt, prompt_logprobs, ref, top=TOP):
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        lp, row = prompt_logprobs[i], ref[i - 1]  # the logits before token i give its logprob
        assert lp.token_id == prompt[i]
        assert abs(lp.logprob - row[prompt[i]]) < ATOL, f"position {i}"
        assert [t for t, _ in lp.top] == np.argsort(-row)[:top].tolist(), f"position {i}"
        assert np.allclose([v for _, v in lp.top], np.sort(row)[::-1][:top], atol=ATOL)


@pytest.mark.parametrize("max_tokens", [0, 3])
async def test_prompt_logprobs_match_transformers(engine, hf_logprobs, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)
    results = await asyncio.gather(*[run(engine, p, params) for p in PROMPTS])
    for prompt, outs in zip(PROMPTS, results):
        ref = hf_logprobs[tuple(prompt)]
        assert_matches(prompt, prompt_logprobs_of(outs), ref)
        ids = [t for out in outs for t in out.token_ids]
        assert len(ids) == max_tokens and outs[-1].finish_reason is FinishReason.LENGTH
        if max_tokens:
            assert ids[0] == int(np.argmax(ref[-1]))  # generation goes on as without prompt logprobs
        else:
            assert outs[0].prompt_logprobs is not None and outs[-1].usage.completion_tokens == 0


async def test_beside_plain_requests_in_one_batch(engine, hf_logprobs):
    """Rows with and without prompt targets share steps: each row reads its own results."""
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    scored = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    jobs = [run(engine, p, plain if i % 2 else scored) for i, p in enumerate(PROMPTS[:3] * 2)]
    results = await asyncio.gather(*jobs)
    for i, outs in enumerate(results):
        prompt = (PROMPTS[:3] * 2)[i]
        if i % 2:
            assert all(out.prompt_logprobs is None for out in outs)
        else:
            assert_matches(prompt, prompt_logprobs_of(outs), hf_logprobs[tuple(prompt)], top=0)


async def test_prefix_cache_hit_still_scores_the_whole_prompt(engine, hf_logprobs):
    prompt = PROMPTS[1]
    cache = engine.scheduler.prefix_cache
    await run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))  # the prompt is cached now
    hits = cache.num_hit_tokens
    outs = await run(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert_matches(prompt, prompt_logprobs_of(outs), hf_logprobs[tuple(prompt)], top=1)
    assert outs[-1].usage.cached_tokens == 0 and cache.num_hit_tokens == hits  # computed, not served
    outs = await run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert outs[-1].usage.cached_tokens > 0  # plain requests still reuse it


async def test_no_compilation_after_warm_up(engine):
    before = engine.runner.num_compiled
    assert before == engine.num_compiled_at_ready
    mixes = [SamplingParams(max_tokens=0, prompt_logprobs=20),
             SamplingParams(max_tokens=2, temperature=0.8, seed=3, logprobs=2, prompt_logprobs=2),
             SamplingParams(max_tokens=2, temperature=0.0)]
    await asyncio.gather(*[run(engine, p, mixes[i % 3]) for i, p in enumerate(PROMPTS * 2)])
    await run(engine, PROMPTS[2], mixes[0])  # alone: a single prefill row
    assert engine.runner.num_compiled == before


async def test_preemption_recomputes_without_repeating(tiny_llama, hf_logprobs):
    # 24 pages of 4 tokens: four requests of up to 75 + 24 tokens cannot all hold their pages at once.
    config = tiny_engine_config(tiny_llama, cache=dict(num_pages=25), max_model_len=96)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)
    async with Engine(config) as small:
        results = await asyncio.gather(*[run(small, p, params) for p in PROMPTS[:3] * 2])
        assert small.scheduler.num_preemptions > 0
    for prompt, outs in zip(PROMPTS[:3] * 2, results):
        assert_matches(prompt, prompt_logprobs_of(outs), hf_logprobs[tuple(prompt)])
        assert len([t for out in outs for t in out.token_ids]) == 16
