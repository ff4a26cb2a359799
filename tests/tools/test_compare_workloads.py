"""tools.compare_workloads: the prompt sets, the sizes from the options, and the one measuring loop."""

import asyncio

import numpy as np
import pytest

from kvloom.tools import compare_workloads
from kvloom.tools.cli import build_parser
from kvloom.tools.command_args import DEFAULT_PEERS

pytestmark = pytest.mark.timeout(30)


def test_prompt_sets_have_the_shapes_asked_for():
    def encode(text):  # a stand-in tokenizer: one or two ids per word
        return [id_ for word in text.split() for id_ in ([len(word) + 10] * (1 + len(word) % 2))]

    sizes = compare_workloads.QUICK
    prompts = compare_workloads.build_prompt_set(encode, np.random.default_rng(0), sizes)
    assert len(prompts.warmup) == max(sizes.concurrency)
    assert {c: len(p) for c, p in prompts.decode.items()} == {c: c for c in sizes.concurrency}
    assert all(len(p) == sizes.prompt_tokens for ps in prompts.decode.values() for p in ps)
    assert len(prompts.prefill) == sizes.repeats
    assert all(len(p) == sizes.prefill_tokens for p in prompts.prefill)
    assert len(prompts.shared) == sizes.num_shared_requests
    assert all(len(p) == sizes.prefix_tokens + sizes.unique_tokens for p in prompts.shared)
    assert all(p[:sizes.prefix_tokens] == prompts.shared[0][:sizes.prefix_tokens] for p in prompts.shared)
    assert len(prompts.score) == sizes.repeats + 1  # one warm-up
    query, items = prompts.score[0]
    assert len(query) == sizes.query_tokens and np.shape(items) == (sizes.num_items, sizes.item_tokens)
    assert len(set(prompts.label_ids)) == 2

    texts = compare_workloads.as_text(prompts, lambda ids: " ".join(map(str, ids)))
    assert texts.prefill[0].split() == [str(i) for i in prompts.prefill[0]]
    assert texts.score == prompts.score


def test_sizes_from_the_options():
    args = build_parser().parse_args(["compare", "--quick", "--peers", "none", "--workloads", "prefill,score",
                                      "--concurrency", "2,3", "--new-tokens", "5"])
    assert args.peers == () and args.workloads == ("prefill", "score")
    sizes = compare_workloads.sizes_from_args(args)
    assert sizes.concurrency == (2, 3) and sizes.new_tokens == 5
    assert sizes.prefill_tokens == compare_workloads.QUICK.prefill_tokens
    defaults = build_parser().parse_args(["compare"])
    assert defaults.peers == DEFAULT_PEERS
    assert compare_workloads.sizes_from_args(defaults) == compare_workloads.FULL
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--peers", "hf,vllm"])


class RecordingSystem(compare_workloads.InProcessSystem):
    """Every call recorded; each first token takes 0.5 s and each score call 0.25 s, by its own word."""

    name = "recording"

    def __init__(self):
        self.calls = []

    async def warm_up(self, prompts):
        self.calls.append("warm_up")

    async def batch(self, prompts, new_tokens):
        self.calls.append(("batch", len(prompts), new_tokens))
        return compare_workloads.measured(float(len(prompts) * new_tokens))

    async def first_token_s(self, prompt):
        self.calls.append(("first_token", len(prompt)))
        return 0.5

    async def score_s(self, query, items, label_ids):
        self.calls.append(("score", len(items)))
        return 0.25


def test_measure_system_runs_each_workload_in_order():
    sizes = compare_workloads.QUICK
    prompts = compare_workloads.build_prompt_set(lambda text: [len(w) for w in text.split()],
                                                 np.random.default_rng(0), sizes)
    system = RecordingSystem()
    out = asyncio.run(compare_workloads.measure_system(system, prompts, sizes, ["shared-prefix", "decode",
                                                                                "prefill",
                                                                                "score"]))
    assert list(out) == ["decode@1", "decode@4", "prefill", "shared-prefix", "score"]
    assert out["decode@4"]["value"] == 4 * sizes.new_tokens
    assert out["prefill"]["value"] == sizes.prefill_tokens / 0.5
    assert out["prefill"]["ttfts_s"] == [0.5] * sizes.repeats
    assert out["score"]["value"] == sizes.num_items / 0.25 and len(out["score"]["times_s"]) == sizes.repeats
    assert system.calls[0] == "warm_up" and system.calls[1:3] == [("batch", 1, sizes.new_tokens),
                                                                  ("batch", 4, sizes.new_tokens)]
    assert system.calls.count(("score", sizes.num_items)) == sizes.repeats + 1  # one untimed warm-up call
    system.can_score = False
    assert list(asyncio.run(compare_workloads.measure_system(system, prompts, sizes, ["score"]))) == []
