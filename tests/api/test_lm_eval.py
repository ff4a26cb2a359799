"""lm-eval itself against a real kvloom server on loopback: its `local-completions` model (echo, logprobs,
prompt token logprobs) on a tiny multiple-choice task from a local data file gives the same accuracies
and per-request loglikelihoods as lm-eval's own `hf` model (transformers) on the same tiny checkpoint."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import lm_eval
import numpy as np
import pytest
import tqdm
import yaml
from lm_eval.tasks import TaskManager

from kvloom.engine.engine import Engine
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(600)

TASK = "kvloom_tiny_mc"
TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_task")
ATOL = 1e-4  # float32 on both sides; a loglikelihood sums a few tokens' logprobs


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """The task's YAML with its data file's absolute path, and the datasets cache in tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread left behind
    with open(os.path.join(TASK_DIR, f"{TASK}.yaml")) as f:
        config = yaml.safe_load(f)
    config["dataset_kwargs"] = {"data_files": {"test": os.path.join(TASK_DIR, f"{TASK}.jsonl")},
                                "cache_dir": str(tmp_path / "datasets")}
    out = tmp_path / "tasks"
    out.mkdir()
    (out / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    return str(out)


def evaluate(model: str, model_args: dict, task_dir: str) -> dict:
    """One lm-eval run of the task (blocking); global seeding left alone."""
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK], task_manager=TaskManager(include_path=task_dir),
        batch_size=1, log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
        torch_random_seed=None, fewshot_random_seed=None)


def loglikelihoods(results: dict) -> dict[int, list[tuple[float, bool]]]:
    """doc id -> (loglikelihood, is greedy) of each choice, as lm-eval got them from the model."""
    return {s["doc_id"]: [(float(ll), bool(greedy)) for ll, greedy in s["filtered_resps"]]
            for s in results["samples"][TASK]}


async def test_local_completions_equals_hf(tiny_llama, task_dir):
    threads_before = set(threading.enumerate())
    loop = asyncio.get_running_loop()
    engine = Engine(tiny_engine_config(tiny_llama))
    served, cleanup = await serve_engine(engine)
    try:
        with ThreadPoolExecutor(1) as pool:  # lm-eval blocks; the server answers on this loop meanwhile
            kvloom = await loop.run_in_executor(pool, evaluate, "local-completions", {
                "base_url": served.api + "/completions", "model": engine.model_name, "tokenizer": tiny_llama,
                "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 256,
                "num_concurrent": 1, "max_retries": 1}, task_dir)
    finally:
        await cleanup()
    with ThreadPoolExecutor(1) as pool:
        hf = await loop.run_in_executor(pool, evaluate, "hf", {
            "pretrained": tiny_llama, "dtype": "float32", "device": "cpu"}, task_dir)

    ours, theirs = loglikelihoods(kvloom), loglikelihoods(hf)
    assert sorted(ours) == sorted(theirs) == list(range(6))
    for doc_id in theirs:
        assert len(ours[doc_id]) == len(theirs[doc_id]) >= 3
        np.testing.assert_allclose([ll for ll, _ in ours[doc_id]], [ll for ll, _ in theirs[doc_id]],
                                   atol=ATOL, rtol=0, err_msg=f"doc {doc_id}")
        assert [g for _, g in ours[doc_id]] == [g for _, g in theirs[doc_id]], f"doc {doc_id}"
        best, second = sorted((ll for ll, _ in theirs[doc_id]), reverse=True)[:2]
        assert best - second > 10 * ATOL  # well apart: equal accuracies are not a matter of rounding
    for metric in ("acc,none", "acc_norm,none"):
        assert kvloom["results"][TASK][metric] == hf["results"][TASK][metric], metric
    leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not leaked, leaked
