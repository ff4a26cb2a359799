"""Multi-item scoring on tiny random Qwen3 and Llama models: every path against transformers' logits
and against each other; isolation between items; softmax, label order and duplicates; limits."""

import asyncio

import numpy as np
import pytest
import pytest_asyncio
import torch

from kvloom.engine.config import ScoringConfig
from kvloom.engine.engine import Engine
from tests import tiny_models
from tests.conftest import tiny_engine_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

RNG = np.random.default_rng(5)
QUERY = RNG.integers(3, tiny_models.VOCAB_SIZE, 37).tolist()
ITEMS = [RNG.integers(3, tiny_models.VOCAB_SIZE, int(n)).tolist() for n in RNG.integers(1, 12, 24)]
LABELS = [5, 17, 301, 17]  # a duplicate on purpose


def scoring_config(mode):
    return ScoringConfig(mode=mode, tokens_per_step=64, max_item_tokens=32, max_items_per_step=16,
                         max_items=200, max_total_tokens=4096)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(tiny_checkpoints):
    """(family, mode) -> a running engine; built on first use, stopped at the end of the module."""
    made = {}

    async def get(family, mode):
        if (family, mode) not in made:
            config = tiny_engine_config(tiny_checkpoints(family), max_model_len=512,
                                        scoring=scoring_config(mode))
            engine = Engine(config)
            await engine.start()
            made[family, mode] = engine
        return made[family, mode]

    yield get
    for engine in made.values():
        await engine.stop()


def hf_label_logprobs(path, prompts, labels):
    hf = tiny_models.load_hf(path)
    out = []
    with torch.no_grad():
        for p in prompts:
            logprobs = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1], -1).numpy()
            out.append(logprobs[labels])
    return np.array(out)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
async def test_every_path_matches_transformers(engines, tiny_checkpoints, family):
    ref = np.exp(hf_label_logprobs(tiny_checkpoints(family), [QUERY + item for item in ITEMS], LABELS))
    results = {}
    for mode in ("single", "batched", "packed"):
        engine = await engines(family, "batched" if mode == "single" else mode)
        out = await engine.score(QUERY, ITEMS, LABELS, mode=mode)
        results[mode] = np.array(out.scores)
        assert out.prompt_tokens == len(QUERY) + sum(map(len, ITEMS))
        rel = np.abs(results[mode] - ref) / np.abs(ref)
        assert rel.max() < 1e-3, f"{mode}: relative error {rel.max():.2e}"
    for mode in ("batched", "packed"):
        np.testing.assert_allclose(results[mode], results["single"], rtol=1e-4)
    assert np.array_equal(results["packed"][:, 1], results["packed"][:, 3])  # duplicate labels agree


@pytest.mark.parametrize("mode", ["batched", "packed"])
async def test_changing_one_item_leaves_the_others(engines, mode):
    engine = await engines("qwen3", mode)
    # The query's pages are in the prefix cache before the base call, as for the changed calls after it (a
    # cold first call would compute the query in other steps, equal only to rounding): the order of the
    # tests in this module, or running this one alone, does not change what is compared.
    await engine.score(QUERY, ITEMS, LABELS)
    base = np.array((await engine.score(QUERY, ITEMS, LABELS)).scores)
    same_len = list(ITEMS)
    same_len[3] = [(t + 1) % tiny_models.VOCAB_SIZE for t in ITEMS[3]]
    other_len = list(ITEMS)
    other_len[3] = ITEMS[3] + [9, 10, 11]
    for changed in (same_len, other_len):
        scores = np.array((await engine.score(QUERY, changed, LABELS)).scores)
        keep = [i for i in range(len(ITEMS)) if i != 3]
        if changed is same_len and mode == "batched":
            assert np.array_equal(scores[keep], base[keep])  # the same shapes: bit for bit
        else:
            np.testing.assert_allclose(scores[keep], base[keep], rtol=1e-6, atol=1e-9)
        assert not np.allclose(scores[3], base[3])


async def test_softmax_order_text_and_item_first(engines, tiny_checkpoints):
    engine = await engines("qwen3", "batched")
    soft = np.array((await engine.score(QUERY, ITEMS[:5], LABELS, apply_softmax=True)).scores)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    plain = np.array((await engine.score(QUERY, ITEMS[:5], LABELS)).scores)
    reordered = np.array((await engine.score(QUERY, ITEMS[:5], LABELS[::-1])).scores)
    np.testing.assert_allclose(reordered, plain[:, ::-1], rtol=1e-6)
    np.testing.assert_allclose(soft, plain / plain.sum(axis=1, keepdims=True), rtol=1e-5)

    text = await engine.score("Hello world, how are", [" you", " they today"], [5, 17])
    tok = engine.tokenizer
    prompts = [tok.encode("Hello world, how are") + tok.encode(t, add_special_tokens=False)
               for t in (" you", " they today")]
    ref = np.exp(hf_label_logprobs(tiny_checkpoints("qwen3"), prompts, [5, 17]))
    np.testing.assert_allclose(np.array(text.scores), ref, rtol=1e-3)

    ref = np.exp(hf_label_logprobs(tiny_checkpoints("qwen3"), [item + QUERY for item in ITEMS[:3]], LABELS))
    for item_first_engine in (engine,
                              await engines("qwen3", "packed")):  # the single path, in any default mode
        first = await item_first_engine.score(QUERY, ITEMS[:3], LABELS, item_first=True)
        np.testing.assert_allclose(np.array(first.scores), ref, rtol=1e-3)
    assert (await engine.score(QUERY, [], LABELS)).scores == []


async def test_invalid_inputs_name_the_field(engines):
    engine = await engines("qwen3", "packed")
    cases = [
        (dict(query=QUERY, items=ITEMS, label_token_ids=[384]), r"label_token_ids\[0\]: token id 384"),
        (dict(query=QUERY, items=ITEMS, label_token_ids=[-1]), r"label_token_ids\[0\]: token id -1"),
        (dict(query=QUERY, items=ITEMS, label_token_ids=[]), r"label_token_ids: must be a non-empty"),
        (dict(query=[], items=ITEMS, label_token_ids=[5]), r"query: must not be empty"),
        (dict(query="", items=["a"], label_token_ids=[5]), r"query: must not be empty"),
        (dict(query=QUERY, items=["text"], label_token_ids=[5]),
         r"items: text and token ids must not be mixed"),
        (dict(query=QUERY, items=[[1, 2], "x"], label_token_ids=[5]), r"items: text and token ids"),
        (dict(query=QUERY, items=[[5]] * 201, label_token_ids=[5]),
         r"items: 201 items exceeds the limit of 200"),
        (dict(query=QUERY, items=[[5] * 33], label_token_ids=[5]),
         r"items\[0\]: 33 tokens exceeds the limit"),
        (dict(query=QUERY, items=[[]], label_token_ids=[5]), r"items\[0\]: must not be empty"),
        (dict(query=QUERY, items=ITEMS, label_token_ids=[5], mode="batched"),
         r"mode: 'batched' is not enabled"),
        (dict(query=[5] * 500, items=[[5] * 20], label_token_ids=[5]), r"query: 500 tokens plus the longest"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            await engine.score(**kwargs)
    assert len((await engine.score(QUERY, ITEMS[:2], [5])).scores) == 2  # unharmed


@pytest.mark.parametrize("mode", ["packed", "batched"])
async def test_scoring_and_generation_together(engines, mode):
    from kvloom.engine.request import SamplingParams

    engine = await engines("llama", mode)
    alone = [t async for out in engine.generate(QUERY[:9], SamplingParams(max_tokens=12, temperature=0,
                                                                           ignore_eos=True))
             for t in out.token_ids]
    expected = np.array((await engine.score(QUERY, ITEMS, LABELS, mode="single")).scores)

    async def generate():
        return [t async for out in engine.generate(QUERY[:9], SamplingParams(max_tokens=12, temperature=0,
                                                                              ignore_eos=True))
                for t in out.token_ids]

    results = await asyncio.gather(engine.score(QUERY, ITEMS, LABELS), generate(), generate(),
                                   engine.score(QUERY[:20], ITEMS[:7], LABELS))
    np.testing.assert_allclose(np.array(results[0].scores), expected, rtol=1e-4)
    assert results[1] == results[2] == alone


async def test_reference_workload_shape_scaled_down(engines):
    """query 2,000 / 500 items of 20 tokens, scaled to the tiny model: query 400 / 100 items of 20."""
    engine = await engines("llama", "packed")
    rng = np.random.default_rng(9)
    query = rng.integers(3, tiny_models.VOCAB_SIZE, 400).tolist()
    items = [rng.integers(3, tiny_models.VOCAB_SIZE, 20).tolist() for _ in range(100)]
    out = await engine.score(query, items, [5, 6])
    scores = np.array(out.scores)
    assert scores.shape == (100, 2) and np.all((scores > 0) & (scores < 1))
    assert out.prompt_tokens == 400 + 100 * 20
