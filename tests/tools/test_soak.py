"""tools.soak: the mixed request stream, then a short soak in-process against a real server over the
tiny model (vocabulary 384, max_model_len 256), in the test's event loop."""

import json

import numpy as np
import pytest

from kvloom.engine.engine import Engine
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config
from kvloom.tools import soak
from kvloom.tools.cli import build_parser

pytestmark = pytest.mark.timeout(180)


def soak_args(url: str, *options: str):
    return build_parser().parse_args(["soak", "--url", url, *options])


def test_mixed_stream_spreads_scores_and_alternates_streaming():
    plan = soak.plan_from_args(soak_args("http://h:1", "--score-fraction", "0.3", "--vocab-size", "384",
                                         "--query-tokens", "6", "--num-items", "3", "--item-tokens", "2",
                                         "--label-token-ids", "5,6", "--max-tokens", "4"))
    specs = soak.mixed_specs(plan.chat, plan.score, plan.score_fraction, np.random.default_rng(0))
    kinds = [soak.kind_of(next(specs)) for _ in range(20)]
    assert kinds.count("score") == 6 and kinds[3] == "score"
    chats = [k for k in kinds if k != "score"]
    assert chats == ["chat_stream", "chat"] * 7
    spec = next(s for s in specs if not s.is_stream and s.path != "/v1/score")
    assert spec.body["stream"] is False and "stream_options" not in spec.body and spec.body["max_tokens"] == 4
    score = next(s for s in specs if s.path == "/v1/score")
    assert score.body["label_token_ids"] == [5, 6] and len(score.body["query"]) == 6
    assert all(100 <= t < 384 for item in score.body["items"] for t in item)


def test_usage_errors_exit_2(capsys):
    assert soak.main_from_args(soak_args("http://h:1", "--score-fraction", "2")) == 2
    assert "--score-fraction" in capsys.readouterr().err


async def test_short_soak_against_the_tiny_model(tiny_llama, tmp_path, capsys):
    served, cleanup = await serve_engine(Engine(tiny_engine_config(tiny_llama)))
    out = tmp_path / "soak.json"
    try:
        code = await soak.run_soak(soak_args(
            served.url, "--duration", "3", "--max-requests", "20", "--concurrency", "2", "--max-tokens", "8",
            "--input-len", "6", "--query-tokens", "24", "--num-items", "4", "--item-tokens", "4",
            "--label-token-ids", "5,6", "--vocab-size", "384", "--progress-interval", "1",
            "--json", str(out)))
    finally:
        await cleanup()
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"]
    assert 0 < report["num_requests"] <= 20 and report["num_errors"] == 0 and report["errors"] == {}
    kinds = report["by_kind"]
    assert kinds["chat_stream"]["num_requests"] > 0 and kinds["score"]["num_requests"] > 0
    assert sum(k["num_requests"] for k in kinds.values()) == report["num_requests"]
    assert kinds["chat_stream"]["ttft_ms"]["count"] == kinds["chat_stream"]["completed"]
    assert kinds["score"]["e2e_ms"]["p99"] is not None
    printed = capsys.readouterr()
    assert "kvloom soak: PASS" in printed.out and "score e2e" in printed.out
    assert "req/s" in printed.err  # the progress line
