"""The real runner on a tiny random Llama, through the engine: continuous batching, chunked prefill,
the prefix cache and preemption all give transformers' greedy tokens; no compiles after warm-up."""

import asyncio
import threading

import numpy as np
import pytest
import pytest_asyncio
import torch

from kvloom.engine.engine import Engine
from kvloom.engine.request import SamplingParams
from kvloom.engine.runner import ModelRunner
from tests import tiny_models
from tests.conftest import tiny_engine_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

RNG = np.random.default_rng(42)
SHARED = RNG.integers(3, tiny_models.VOCAB_SIZE, 40).tolist()
PROMPTS = [
    RNG.integers(3, tiny_models.VOCAB_SIZE, 5).tolist(),
    RNG.integers(3, tiny_models.VOCAB_SIZE, 70).tolist(),  # longer than a 32-token chunk
    SHARED + [7, 8, 9],
    SHARED + [10, 11],  # shares 40 tokens with the previous prompt
    RNG.integers(3, tiny_models.VOCAB_SIZE, 17).tolist(),
    RNG.integers(3, tiny_models.VOCAB_SIZE, 33).tolist(),
]
NUM_TOKENS = 12


@pytest.fixture(scope="module")
def hf_greedy(tiny_llama):
    hf = tiny_models.load_hf(tiny_llama)
    out = {}
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([p])
            gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NUM_TOKENS,
                              do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            out[tuple(p)] = gen[0, len(p):].tolist()
    return out


class RecordingRunner(ModelRunner):
    def step(self, batch):
        self.step_threads = getattr(self, "step_threads", set()) | {threading.current_thread()}
        return super().step(batch)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_llama):
    async with Engine(tiny_engine_config(tiny_llama), runner_factory=RecordingRunner) as engine:
        yield engine


async def generate_ids(engine, prompt, params):
    ids, outs = [], []
    async for out in engine.generate(prompt, params):
        ids += out.token_ids
        outs.append(out)
    return ids, outs


GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)


async def test_concurrent_greedy_matches_transformers(engine, hf_greedy):
    results = await asyncio.gather(*[generate_ids(engine, p, GREEDY) for p in PROMPTS])
    for prompt, (ids, _) in zip(PROMPTS, results):
        assert ids == hf_greedy[tuple(prompt)], f"prompt of {len(prompt)} tokens"
    assert engine.runner.step_threads == {engine._compute.thread}


async def test_decode_steps_run_the_cpu_kernel_where_the_machine_builds_it(engine):
    from kvloom.kernels import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    assert (engine.runner.cpu_kernels is not None) == (reason is None), reason
    assert engine.status()["config"]["cpu_kernel_in_use"] == (reason is None)


async def test_prefix_cache_hit_gives_the_same_tokens(engine, hf_greedy):
    prompt = PROMPTS[1]
    await generate_ids(engine, prompt, GREEDY)
    ids, outs = await generate_ids(engine, prompt, GREEDY)
    assert ids == hf_greedy[tuple(prompt)]
    assert outs[-1].usage.cached_tokens >= 64
    assert engine.scheduler.prefix_cache.num_hit_tokens > 0


async def test_no_compilation_after_warm_up(engine):
    before = engine.runner.num_compiled
    assert before == engine.num_compiled_at_ready and before > 0
    mixes = [
        SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(max_tokens=5, temperature=1.0, top_k=5, min_p=0.05, repetition_penalty=1.3, seed=2),
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=5, frequency_penalty=0.5,
                       presence_penalty=0.3),
        SamplingParams(max_tokens=5, temperature=0.8, logit_bias={7: 3.0, 9: -100.0}, min_tokens=3, seed=3),
        GREEDY,
    ]
    jobs = [generate_ids(engine, p, mixes[i % len(mixes)]) for i, p in enumerate(PROMPTS * 2)]
    await asyncio.gather(*jobs)
    await generate_ids(engine, PROMPTS[0], GREEDY)  # alone: a single-row decode bucket
    assert engine.runner.num_compiled == before


async def test_seed_gives_the_same_tokens_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=77)
    alone, _ = await generate_ids(engine, PROMPTS[4], params)
    noise = [generate_ids(engine, p, SamplingParams(max_tokens=10, temperature=1.0)) for p in PROMPTS[:3]]
    together = await asyncio.gather(generate_ids(engine, PROMPTS[4], params), *noise)
    assert together[0][0] == alone
    other, _ = await generate_ids(engine, PROMPTS[4], SamplingParams(max_tokens=10, temperature=1.0, seed=78))
    assert other != alone


async def test_logprobs_match_transformers(engine, tiny_llama):
    prompt = PROMPTS[0]
    ids, outs = await generate_ids(engine, prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=4,
                                                                  ignore_eos=True))
    logprobs = [lp for o in outs for lp in o.logprobs]
    hf = tiny_models.load_hf(tiny_llama)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + ids])).logits[0], -1).numpy()
    for i, lp in enumerate(logprobs):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == ids[i]
        assert abs(lp.logprob - row[ids[i]]) < 1e-4
        assert [t for t, _ in lp.top] == np.argsort(-row)[:4].tolist()
        assert np.allclose([v for _, v in lp.top], np.sort(row)[::-1][:4], atol=1e-4)


async def test_logit_bias_forces_and_removes_tokens(engine, tiny_llama, hf_greedy):
    prompt = PROMPTS[0]
    best = hf_greedy[tuple(prompt)][0]
    forced = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
    assert (await generate_ids(engine, prompt, forced))[0] == [42] * 4
    sampled = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, logit_bias={42: 100.0}, seed=5)
    assert (await generate_ids(engine, prompt, sampled))[0] == [42] * 4
    hf = tiny_models.load_hf(tiny_llama)
    with torch.no_grad():
        last = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    assert int(np.argmax(last)) == best
    banned = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias={best: -100.0})
    assert (await generate_ids(engine, prompt, banned))[0] == [int(np.argsort(-last)[1])]


async def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    eos = engine.tokenizer.eos_token_ids[0]
    prompt = PROMPTS[4]
    eager = dict(max_tokens=8, temperature=0.0, logit_bias={eos: 100.0})  # eos is the greedy token
    ids, outs = await generate_ids(engine, prompt, SamplingParams(**eager))
    assert ids == [eos] and outs[-1].finish_reason.value == "stop"
    ids, outs = await generate_ids(engine, prompt, SamplingParams(**eager, min_tokens=3))
    assert len(ids) == 4 and eos not in ids[:3] and ids[3] == eos
    assert outs[-1].finish_reason.value == "stop" and outs[-1].usage.completion_tokens == 4
    stop = SamplingParams(max_tokens=8, temperature=1.0, seed=9, logit_bias={42: 100.0}, stop_token_ids=(42,),
                          min_tokens=2)
    ids, outs = await generate_ids(engine, prompt, stop)
    assert len(ids) == 3 and 42 not in ids[:2] and ids[2] == 42 and outs[-1].stop_reason == 42


async def test_skip_special_tokens_decides_whether_they_are_text(engine):
    im_start = engine.tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(im_start) == 1
    forced = dict(max_tokens=2, temperature=0.0, ignore_eos=True, logit_bias={im_start[0]: 100.0})
    _, outs = await generate_ids(engine, PROMPTS[0], SamplingParams(**forced))
    assert "".join(o.text for o in outs) == ""
    _, outs = await generate_ids(engine, PROMPTS[0], SamplingParams(**forced, skip_special_tokens=False))
    assert "".join(o.text for o in outs) == "<|im_start|><|im_start|>"


async def test_kv_cache_is_donated(engine):
    old = engine.runner.kv[0]
    await generate_ids(engine, PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0))
    assert old.is_deleted()


async def test_preemption_under_page_pressure_keeps_outputs(tiny_llama, hf_greedy):
    # 32 pages of 4 tokens hold one 128-token context, not four requests of up to 82 tokens at once.
    config = tiny_engine_config(tiny_llama, cache=dict(num_pages=33), max_model_len=128)
    async with Engine(config) as small:
        results = await asyncio.gather(*[generate_ids(small, p, GREEDY) for p in PROMPTS])
        assert small.scheduler.num_preemptions > 0
    for prompt, (ids, _) in zip(PROMPTS, results):
        assert ids == hf_greedy[tuple(prompt)]
