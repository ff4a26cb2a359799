"""/metrics speaks vLLM's names and labels: every metric the Grafana dashboard in tools/ queries is in a
real scrape after some traffic, each with the served model's name in `model_name`."""

import json
import os
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "grafana_dashboard.json")
METRIC_NAME = re.compile(r"\b(?:vllm:|kvloom_)[a-z0-9_:]+")
# What vLLM's own dashboards and alerts read, where kvloom's meaning is the same.
VLLM_NAMES = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
              "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
              "vllm:generation_tokens_total",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
              "vllm:num_preemptions_total"}


def dashboard_queries() -> list[str]:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


async def scrape_after_traffic(served) -> dict:
    """sample name -> label dicts, after chats (one prompt twice: prefix cache hits) and a bad request."""
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            body = {"messages": [{"role": "user", "content": "Tell me a story about the sea"}],
                    "max_tokens": 4, "stream": True}
            async with s.post(served.api + "/chat/completions", json=body) as r:
                assert r.status == 200
                await r.read()
        async with s.post(served.api + "/completions", json={"prompt": "x", "max_tokens": -1}) as r:
            assert r.status == 400
        async with s.get(served.url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


async def test_every_dashboard_metric_is_scraped(fake_server):
    samples = await scrape_after_traffic(fake_server)
    queried = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert VLLM_NAMES <= queried
    assert {"kvloom_engine_ready", "kvloom_request_errors_total"} <= queried  # kvloom's own, beside them
    for name in sorted(queried | VLLM_NAMES):
        assert name in samples, f"{name} is queried but not exported"
        assert all(labels.get("model_name") == "llama" for labels in samples[name]), name


async def test_values_after_traffic(fake_server):
    samples = await scrape_after_traffic(fake_server)
    assert {"finished_reason": "length", "model_name": "llama"} in samples["vllm:request_success_total"]
    assert {"error_type": "invalid_value", "model_name": "llama"} in samples["kvloom_request_errors_total"]
    async with aiohttp.ClientSession() as s:
        async with s.get(fake_server.url + "/metrics") as r:
            families = text_string_to_metric_families(await r.text())
            values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                      for family in families for sample in family.samples}
    model = (("model_name", "llama"),)
    assert values[("vllm:prefix_cache_hits_total", model)] > 0  # the second chat reused the first's prompt
    hits = values[("vllm:prefix_cache_hits_total", model)]
    queries = values[("vllm:prefix_cache_queries_total", model)]
    assert queries >= hits
    assert values[("vllm:num_requests_running", model)] == 0
    assert 0 <= values[("vllm:kv_cache_usage_perc", model)] <= 1
    assert values[("vllm:generation_tokens_total", model)] >= 8
    # the prefill throughput the router reads: prompt tokens the steps computed (the uncached ones), seconds
    assert values[("kvloom_prefill_tokens_total", model)] == queries - hits
    assert values[("kvloom_prefill_seconds_total", model)] > 0
