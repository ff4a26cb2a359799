"""Scoring mode is data: the mode a call asks for is the path that runs, seen in the batches the runner gets
(rows per score step, items per row), with the deterministic fake runner; and the step contract around it."""

import numpy as np
import pytest

from kvloom.engine.batch import ScheduledBatch, check_runner
from kvloom.engine.buckets import BucketPlan
from kvloom.engine.config import ScoringConfig, SchedulerConfig
from kvloom.engine.engine import Engine
from kvloom.engine.pages import PageAllocator
from kvloom.engine.radix_cache import make_prefix_cache
from kvloom.engine.request import Request, SamplingParams, ScoreTask
from kvloom.engine.scheduler import Scheduler
from tests import fake_runner
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(180)

QUERY = list(range(10, 40))
ITEMS = [[50 + i, 60 + i, 70 + i] for i in range(12)]  # 12 items of 3 tokens
LABELS = [5, 7]


def scoring(**overrides):
    return ScoringConfig(**{**dict(tokens_per_step=64, max_item_tokens=32, max_items_per_step=16),
                            **overrides})


def score_batches(runner) -> list[ScheduledBatch]:
    return [b for b in runner.batches if b.score_rows]


@pytest.fixture
def both_modes(tiny_llama):
    make = fake_runner.factory()
    config = tiny_engine_config(tiny_llama, scoring=scoring(mode="packed", also_enabled=("batched",)))
    return Engine(config, runner_factory=make), make


async def test_each_mode_runs_its_own_path(both_modes):
    engine, make = both_modes
    async with engine:
        runner = make.made[-1]
        results = {}
        for mode in ("packed", "batched", "single"):
            runner.batches.clear()
            results[mode] = (await engine.score(QUERY, ITEMS, LABELS, mode=mode)).scores
            batches = score_batches(runner)
            if mode == "packed":  # one row per step holding many items
                assert batches and all(len(b.score_rows) == 1 for b in batches)
                assert max(len(b.score_rows[0].items) for b in batches) > 1
                assert all(b.shape.num_prefill_rows == 1 for b in batches)
            elif mode == "batched":  # one item per row, many rows per step
                assert batches and all(len(row.items) == 1 for b in batches for row in b.score_rows)
                assert max(len(b.score_rows) for b in batches) > 1
                assert all(b.shape.num_prefill_rows > 1 for b in batches)
            else:  # each item its own request: no score steps, prefills ending in label logprobs
                assert not batches
                labelled = [row for b in runner.batches for row in b.rows if row.label_ids]
                assert len(labelled) == len(ITEMS)
            items_seen = [i for b in batches for row in b.score_rows for i, _ in row.items]
            assert items_seen == (list(range(len(ITEMS))) if mode != "single" else [])
        metrics = engine.metrics.render().decode()
        name = engine.model_name
        for mode in ("packed", "batched"):
            sample = f'kvloom_score_items_total{{mode="{mode}",model_name="{name}"}} {float(len(ITEMS))}'
            assert sample in metrics
        assert f'kvloom_score_rows_total{{mode="packed",model_name="{name}"}}' in metrics
        assert 'mode="single"' not in metrics
        np.testing.assert_allclose(results["packed"], results["single"], rtol=1e-6)
        np.testing.assert_allclose(results["batched"], results["single"], rtol=1e-6)


async def test_default_mode_and_refused_modes(tiny_llama):
    make = fake_runner.factory()
    async with Engine(tiny_engine_config(tiny_llama, scoring=scoring(mode="batched")),
                      runner_factory=make) as engine:
        assert engine.plan.score_modes == ("batched",)  # only the enabled mode's shapes are compiled
        await engine.score(QUERY, ITEMS, LABELS)
        assert all(len(row.items) == 1 for b in score_batches(make.made[-1]) for row in b.score_rows)
        with pytest.raises(ValueError, match=r"^mode: 'packed' is not enabled on this engine"):
            await engine.score(QUERY, ITEMS, LABELS, mode="packed")
        with pytest.raises(ValueError, match=r"^mode: 'fastest' is not enabled"):
            await engine.score(QUERY, ITEMS, LABELS, mode="fastest")


async def test_item_first_runs_in_packed_default(tiny_llama):
    """item_first takes the single path whatever the default mode: each item, then the query, one request."""
    make = fake_runner.factory()
    async with Engine(tiny_engine_config(tiny_llama, scoring=scoring()), runner_factory=make) as engine:
        out = await engine.score(QUERY, ITEMS[:3], LABELS, item_first=True)
        assert len(out.scores) == 3
        prompts = {}
        for b in make.made[-1].batches:
            for row in b.rows:
                prompts.setdefault(row.request_id, []).extend(row.token_ids)
        item_first = sorted(p for p in prompts.values() if p[-len(QUERY):] == QUERY)
        assert item_first == sorted(i + QUERY for i in ITEMS[:3])


def test_bucket_plan_compiles_only_enabled_modes():
    cfg = SchedulerConfig(max_running=4, max_tokens_per_step=64, chunk_size=32, max_prefill_seqs=2)
    packed = BucketPlan.from_config(cfg, scoring())
    both = BucketPlan.from_config(cfg, scoring(also_enabled=("batched",)))
    single = BucketPlan.from_config(cfg, scoring(mode="single"))
    assert packed.score_modes == ("packed",) and both.score_modes == ("packed", "batched")
    assert single.score_modes == () and not any(s.is_score for s in single.all_shapes())
    assert {(s.num_prefill_rows, s.prefill_len) for s in packed.all_shapes() if s.is_score} == {(1, 64)}
    assert any(s.num_prefill_rows > 1 for s in both.all_shapes() if s.is_score)


@pytest.mark.parametrize("mode", ["packed", "batched"])
def test_schedule_changes_no_request(mode):
    """schedule() builds the same score step until apply() records its results."""
    cfg = SchedulerConfig(max_running=4, max_tokens_per_step=64, chunk_size=32, max_prefill_seqs=2)
    allocator = PageAllocator(64)
    s = Scheduler(cfg, BucketPlan.from_config(cfg, scoring(mode=mode)), allocator,
                  make_prefix_cache(allocator, 4, True), page_size=4)
    request = Request("s", tuple(QUERY), SamplingParams(max_tokens=1),
                      score=ScoreTask(tuple((50 + i, 60 + i, 70 + i) for i in range(30)), tuple(LABELS),
                                      mode=mode))
    s.add(request)
    while not request.has_items_to_score:  # prefill the query
        batch = s.schedule()
        s.apply(batch, fake_runner.fake_result(batch, 97))
    first, again = s.schedule(), s.schedule()
    assert first.score_rows == again.score_rows and request.score.num_scored == 0
    s.apply(first, fake_runner.fake_result(first, 97))
    scored = sum(len(row.items) for row in first.score_rows)
    assert request.score.num_scored == scored and s.schedule().score_rows[0].items[0][0] == scored


def test_runner_protocol_checked_at_construction():
    class Incomplete:
        vocab_size, page_size = 10, 4

        def step(self, batch):
            return None

    with pytest.raises(TypeError, match=r"^runner: Incomplete does not implement the Runner protocol "
                                        r"\(missing source, model_config, max_model_len"):
        check_runner(Incomplete())


async def test_engine_refuses_a_runner_that_does_not_fit(tiny_llama):
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=lambda config, plan: object())
    with pytest.raises(TypeError, match="does not implement the Runner protocol"):
        await engine.start()
    assert engine.join_compute_thread(5)
