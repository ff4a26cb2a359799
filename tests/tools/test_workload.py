"""tools.workload: length distributions, prompt ids inside the vocabulary, request bodies."""

import numpy as np
import pytest

from kvloom.tools import workload

pytestmark = pytest.mark.timeout(30)


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert workload.parse_length_dist("fixed", 7).sample(rng) == 7
    uniform = workload.parse_length_dist("uniform:64:256", 128)
    samples = [uniform.sample(rng) for _ in range(500)]
    assert 64 <= min(samples) and max(samples) <= 256 and len(set(samples)) > 50
    assert workload.parse_length_dist("uniform", 100) == workload.LengthDist("uniform", 50, 150)
    normal = workload.parse_length_dist("normal:10", 100)
    assert normal == workload.LengthDist("normal", 100, 10)
    assert abs(np.mean([normal.sample(rng) for _ in range(500)]) - 100) < 3
    assert all(workload.parse_length_dist("normal:2:50", 2).sample(rng) >= 1 for _ in range(100))
    for spec in ("uniform:9:3", "uniform:1", "normal:a", "gamma", "fixed:3"):
        with pytest.raises(ValueError, match="length distribution"):
            workload.parse_length_dist(spec, 10)


def test_prompt_ids_stay_in_the_vocabulary():
    assert workload.prompt_id_range(None) == workload.prompt_id_range(49152) == (100, 1000)
    low, high = workload.prompt_id_range(384)
    assert (low, high) == (100, 384)
    assert workload.prompt_id_range(150) == (3, 150)  # too small for [100, ...): from 3, past the specials
    prompts = workload.random_prompts(np.random.default_rng(0), 3, 5, (low, high))
    assert len(prompts) == 3 and all(len(p) == 5 and all(low <= t < high for t in p) for p in prompts)


def test_score_bodies_and_non_streaming_chat():
    score = workload.Workload(kind="score", api="completions", prompt_format="ids",
                              input_len=workload.LengthDist("fixed", 6),
                              output_len=workload.LengthDist("fixed", 1),
                              id_range=(10, 20), model="m", extra_body={"model": "other", "x": 1},
                              query_tokens=6,
                              num_items=2, item_tokens=3, label_token_ids=(4, 5))
    spec = next(workload.request_specs(score, np.random.default_rng(0), workload.SharedPrefix(0, (10, 20))))
    assert spec.path == "/v1/score" and spec.num_items == 2 and not spec.is_stream
    assert spec.body["model"] == "m" and spec.body["x"] == 1  # the tool's fields win over --extra-body
    assert np.shape(spec.body["items"]) == (2, 3) and len(spec.body["query"]) == 6
    chat = workload.Workload(kind="generate", api="chat", prompt_format="text",
                             input_len=workload.LengthDist("fixed", 4),
                             output_len=workload.LengthDist("fixed", 2))
    streamed = next(workload.request_specs(chat, np.random.default_rng(0), workload.SharedPrefix(0, (10,
                                                                                                     20))))
    answered = workload.non_streaming(streamed)
    assert streamed.is_stream and streamed.body["stream_options"] == {"include_usage": True}
    assert not answered.is_stream and answered.body["stream"] is False
    assert "stream_options" not in answered.body
    assert answered.body["messages"] == streamed.body["messages"] and answered.body["max_tokens"] == 2
