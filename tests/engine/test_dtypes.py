"""Precision as a choice: the weights' dtype and the KV cache's own (`dtype`, `kv_cache_dtype`) on a tiny
random Llama, each combination through the engine beside the float32 engine: prompt and output logprobs
within a tolerance per combination, greedy tokens equal wherever the float32 model's choice is not a
near tie, the cache in its dtype and its memory per token; and the config refusing what it does not know."""

import numpy as np
import pytest
import pytest_asyncio

from kvloom.engine.config import ConfigError, EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.request import SamplingParams
from kvloom.kernels.kv_format import cache_dtype, storage_dtype
from tests import tiny_models
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(300)

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(3, tiny_models.VOCAB_SIZE, n).tolist() for n in (5, 21, 47)]  # 47: two chunks
NEW_TOKENS = 12
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2,
                        prompt_logprobs=0)
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# (weights, KV cache, largest |logprob difference| from the float32 engine: about 4x what they give)
COMBOS = [
    ("float32", "bfloat16", 0.015),
    ("float32", "float16", 0.002),
    ("float16", "auto", 0.01),
    ("float16", "float32", 0.01),
    ("bfloat16", "auto", 0.05),
    ("bfloat16", "float32", 0.05),
]


def engine_config(model, dtype="float32", kv_cache_dtype="auto"):
    # only the shapes these requests use are compiled
    return tiny_engine_config(model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, warmup=False)


async def run(engine):
    """Per prompt: (prompt token logprobs, generated ids, their logprobs, the top-2 margins)."""
    results = []
    for prompt in PROMPTS:
        outs = [out async for out in engine.generate(prompt, PARAMS)]
        [prompt_lps] = [out.prompt_logprobs for out in outs if out.prompt_logprobs is not None]
        lps = [lp for out in outs for lp in out.logprobs]
        results.append(dict(prompt=np.array([lp.logprob for lp in prompt_lps[1:]]),
                            ids=[lp.token_id for lp in lps], logprobs=np.array([lp.logprob for lp in lps]),
                            margins=np.array([lp.top[0][1] - lp.top[1][1] for lp in lps])))
    return results


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(tiny_llama):
    async with Engine(engine_config(tiny_llama)) as engine:
        yield await run(engine), engine.status()["kv_cache"]["num_bytes"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("dtype,kv_cache_dtype,tolerance", COMBOS)
async def test_each_precision_stays_close_to_float32(tiny_llama, reference, dtype, kv_cache_dtype, tolerance):
    want, f32_bytes = reference
    async with Engine(engine_config(tiny_llama, dtype, kv_cache_dtype)) as engine:
        kv_dtype = dtype if kv_cache_dtype == "auto" else kv_cache_dtype
        status = engine.status()
        assert status["config"]["kv_cache_dtype"] == kv_dtype
        assert status["config"]["layers_per_call"] == 2  # the tiny model's two layers, one call
        assert cache_dtype(engine.runner.kv[0].dtype).name == kv_dtype
        assert engine.runner.kv[0].dtype == storage_dtype(kv_dtype)  # bfloat16: as uint16 bits
        assert engine.runner.params["embed"].dtype.name == dtype
        assert status["kv_cache"]["num_bytes"] == f32_bytes * ITEMSIZE[kv_dtype] // 4  # same pages, its bytes
        got = await run(engine)
    compared = 0
    for ours, theirs in zip(got, want):
        assert np.abs(ours["prompt"] - theirs["prompt"]).max() < tolerance
        # Greedy tokens may part only where float32's best two are within twice the tolerance (a near tie
        # may go either way); their logprobs agree as far as the tokens do.
        agree = 0
        for ours_id, their_id, margin in zip(ours["ids"], theirs["ids"], theirs["margins"]):
            if ours_id != their_id:
                assert margin < 2 * tolerance, f"token {agree} differs where float32's margin is {margin:.3f}"
                break
            agree += 1
        assert np.abs(ours["logprobs"][:agree] - theirs["logprobs"][:agree]).max(initial=0) < tolerance
        compared += agree
    assert compared >= NEW_TOKENS  # the comparison is not empty


def test_the_config_names_a_dtype_it_does_not_know():
    with pytest.raises(ConfigError, match=r"^dtype: must be one of float32, bfloat16, float16, got 'int8'"):
        EngineConfig(dtype="int8")
    with pytest.raises(ConfigError,
                       match=r"^kv_cache_dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    assert EngineConfig(dtype="bfloat16").resolved_kv_cache_dtype == "bfloat16"
    assert EngineConfig(dtype="bfloat16", kv_cache_dtype="float32").resolved_kv_cache_dtype == "float32"
