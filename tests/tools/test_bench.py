"""tools.bench: options into a plan and its request bodies, then end-to-end runs against a kvloom server
(the deterministic fake runner) on loopback, in the test's event loop."""

import asyncio
import json
import socket

import numpy as np
import pytest
from aiohttp import web

from kvloom.api.server import start_server
from tests.api.conftest import fake_server  # noqa: F401 - the fixture, reused
from kvloom.tools import bench, workload
from kvloom.tools.cli import build_parser

pytestmark = pytest.mark.timeout(120)


def bench_args(url: str, *options: str):
    return build_parser().parse_args(["bench", "--url", url, "--no-progress", *options])


def small_generation(url: str, *options: str):
    """Id prompts that fit the fake server: vocabulary 384, max_model_len 256."""
    return bench_args(url, "--vocab-size", "384", "--input-len", "24", "--input-len-dist", "uniform:8:48",
                      "--output-len", "4", "--ignore-eos", *options)


# ---- workload -----------------------------------------------------------------------------------

def test_synthetic_prompts_share_their_prefix_and_stay_in_the_vocabulary():
    args = bench_args("http://127.0.0.1:1", "--vocab-size", "384", "--input-len", "40",
                      "--shared-prefix-ratio", "0.5", "--output-len", "3")
    plan = bench.plan_from_args(args).workload
    assert plan.id_range == (100, 384)
    specs = workload.request_specs(plan, np.random.default_rng(1), workload.SharedPrefix(0, plan.id_range))
    bodies = [next(specs).body for _ in range(5)]
    prompts = [b["prompt"] for b in bodies]
    assert all(len(p) == 40 and all(100 <= t < 384 for t in p) for p in prompts)
    assert all(p[:20] == prompts[0][:20] for p in prompts)  # the shared half
    assert len({tuple(p[20:]) for p in prompts}) == 5  # the rest differs
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert bodies[0]["max_tokens"] == 3 and "ignore_eos" not in bodies[0]


def test_text_prompts_and_score_bodies():
    chat = bench.plan_from_args(bench_args("http://h:1", "--api", "chat", "--input-len", "12",
                                           "--shared-prefix-ratio", "0.25", "--model", "m")).workload
    assert chat.prompt_format == "text"
    specs = workload.request_specs(chat, np.random.default_rng(0), workload.SharedPrefix(0, chat.id_range))
    a, b = next(specs), next(specs)
    assert a.path == "/v1/chat/completions" and a.body["model"] == "m"
    words_a, words_b = (s.body["messages"][0]["content"].split() for s in (a, b))
    assert len(words_a) == 12 and words_a[:3] == words_b[:3]
    score = bench.plan_from_args(bench_args("http://h:1/v1/", "--workload", "score", "--query-tokens", "5",
                                            "--num-items", "3", "--item-tokens", "4",
                                            "--label-token-ids", "1,2")).workload
    spec = next(workload.request_specs(score, np.random.default_rng(0), workload.SharedPrefix(0,
                                                                                              score.id_range)))
    assert spec.path == "/v1/score" and not spec.is_stream and spec.num_items == 3
    assert len(spec.body["query"]) == 5 and np.shape(spec.body["items"]) == (3, 4)
    assert spec.body["label_token_ids"] == [1, 2]


@pytest.mark.parametrize("options, message", [
    (["--api", "chat", "--prompt-format", "ids"], "--prompt-format ids"),
    (["--slo", "ttft_p99=500"], "--slo: SLO ttft_p99: '500' is not a duration"),
    (["--workload", "score"], "--label-token-ids"),
    (["--workload", "score", "--label-token-ids", "1", "--slo", "ttft_p99=1s"], "no meaning"),
    (["--sweep-concurrency", "1,0"], "--sweep-concurrency"),
    (["--sweep-concurrency", "1", "--sweep-rate", "2"], "not both"),
    (["--extra-body", "[1]"], "JSON object"),
    (["--shared-prefix-ratio", "1.5"], "--shared-prefix-ratio"),
    (["--input-len-dist", "uniform:5"], "length distribution"),
    (["--prompts-file", "/nonexistent/prompts.jsonl"], "--prompts-file"),
])
async def test_usage_errors_exit_2(options, message, capsys):
    assert await bench.run_bench(bench_args("http://127.0.0.1:1", *options)) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--sweep-concurrency" in capsys.readouterr().out


# ---- against a kvloom server --------------------------------------------------------------------

async def test_completions_run_counts_and_slos(fake_server, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "summary.json"
    args = small_generation(fake_server.url, "--concurrency", "3", "--num-requests", "12",
                            "--warmup-requests", "2",
                            "--shared-prefix-ratio", "0.5", "--slo", "ttft_p99=60s,e2e_p50=60s,error_rate=0%",
                            "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["num_requests"] == 12 and s["completed"] == 12
    assert s["num_errors"] == 0 and s["errors"] == {} and s["error_rate"] == 0.0
    assert s["output_tokens"] == 12 * 4
    assert 12 * 8 <= s["input_tokens"] <= 12 * 48
    assert s["warmup"] == {"num_requests": 2, "num_errors": 0}
    assert s["ttft_ms"]["count"] == 12 and s["e2e_ms"]["count"] == 12 and s["tpot_ms"]["count"] == 12
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert 0 < s["itl_ms"]["count"] <= 12 * 3
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert s["load"] == {"concurrency": 3, "request_rate": None, "arrival": None}
    assert s["config"]["model"] == fake_server.engine.model_name
    assert [r["passed"] for r in s["slos"]] == [True, True, True] and s["passed"] is True
    printed = capsys.readouterr().out
    assert "12 completed of 12 sent" in printed and "ttft_p99" in printed and "PASS" in printed


async def test_chat_run_with_text_prompts(fake_server, tmp_path):  # noqa: F811
    out = tmp_path / "chat.json"
    args = bench_args(fake_server.url, "--api", "chat", "--input-len", "8", "--output-len", "4",
                      "--ignore-eos",
                      "--concurrency", "2", "--num-requests", "4", "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 4 and s["num_errors"] == 0 and s["output_tokens"] == 16
    assert s["input_tokens"] > 4 * 8  # words and the chat template


async def test_an_slo_that_cannot_pass_exits_1(fake_server, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "slo.json"
    args = small_generation(fake_server.url, "--concurrency", "2", "--num-requests", "4",
                            "--slo", "e2e_p50=0.001ms,error_rate=0%", "--json", str(out))
    assert await bench.run_bench(args) == 1
    s = json.loads(out.read_text())
    e2e, errors = s["slos"]
    assert not e2e["passed"] and e2e["violation_rate"] == 1.0 and e2e["measured"] > 0.001
    assert errors["passed"] and s["passed"] is False
    assert "FAIL" in capsys.readouterr().out


async def test_rate_and_duration_modes(fake_server, tmp_path):  # noqa: F811
    out = tmp_path / "rate.json"
    args = small_generation(fake_server.url, "--request-rate", "200", "--arrival", "constant",
                            "--num-requests", "6", "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["load"]["request_rate"] == 200 and s["load"]["arrival"] == "constant"

    args = small_generation(fake_server.url, "--request-rate", "100", "--concurrency", "2",
                            "--duration", "0.2",
                            "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == s["num_requests"] >= 1 and s["num_errors"] == 0
    assert s["config"]["num_requests"] is None and s["config"]["duration"] == 0.2


async def test_prompts_file(fake_server, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    chat_line = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 2}
    prompts.write_text(json.dumps({"prompt": "The quick brown fox"}) + "\n\n" + json.dumps(chat_line) + "\n")
    out = tmp_path / "file.json"
    args = bench_args(fake_server.url, "--api", "chat", "--prompts-file", str(prompts), "--output-len", "3",
                      "--ignore-eos", "--num-requests", "4", "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 4 and s["output_tokens"] == 3 + 2 + 3 + 2
    bad = bench_args(fake_server.url, "--prompts-file", str(prompts))  # messages need --api chat
    assert await bench.run_bench(bad) == 2


def score_args(url: str, out, *options: str):
    return bench_args(url, "--workload", "score", "--query-tokens", "8", "--num-items", "3",
                      "--item-tokens", "4", "--label-token-ids", "5,6", "--vocab-size", "384",
                      "--concurrency", "2", "--num-requests", "5",
                      "--json", str(out), *options)


async def test_score_workload(fake_server, tmp_path):  # noqa: F811
    out = tmp_path / "score.json"
    assert await bench.run_bench(score_args(fake_server.url, out)) == 0
    s = json.loads(out.read_text())
    assert s["num_requests"] == 5 and s["ttft_ms"]["count"] == 0
    if s["errors"] == {"http_501:not_implemented": 5}:  # /v1/score not served yet
        assert s["completed"] == 0 and s["items_per_s"] == 0.0
    else:
        assert s["completed"] == 5 and s["num_errors"] == 0
        assert s["items"] == 15 and s["items_per_s"] > 0 and s["e2e_ms"]["count"] == 5


@pytest.fixture
async def stub_server():
    """A server whose /v1/score answers 501 in OpenAI's envelope and whose /v1/completions never answers."""
    async def not_implemented(request):
        await request.read()
        body = {"error": {"message": "/v1/score is not implemented yet", "type": "not_implemented",
                          "param": None, "code": "not_implemented"}}
        return web.json_response(body, status=501)

    async def hang(request):
        await request.read()
        await asyncio.Event().wait()

    app = web.Application()
    app.router.add_post("/v1/score", not_implemented)
    app.router.add_post("/v1/completions", hang)
    runner, url = await start_server(app)
    yield url
    await runner.cleanup()


async def test_score_501_is_reported_cleanly(stub_server, tmp_path, capsys):
    out = tmp_path / "score.json"
    assert await bench.run_bench(score_args(stub_server, out, "--slo", "error_rate=50%")) == 1
    s = json.loads(out.read_text())
    assert s["completed"] == 0 and s["num_errors"] == 5
    assert s["errors"] == {"http_501:not_implemented": 5} and s["error_rate"] == 1.0
    assert s["items"] == 0 and s["items_per_s"] == 0.0
    assert s["config"]["model"] is None  # the stub has no /v1/models: the body names no model
    assert "http_501:not_implemented" in capsys.readouterr().out


async def test_sweep_with_plot(fake_server, tmp_path, capsys):  # noqa: F811
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = small_generation(fake_server.url, "--sweep-concurrency", "1,2,4", "--num-requests", "4",
                            "--warmup-requests", "1", "--slo", "ttft_p99=500ms,e2e_p99=6.5s,itl_p50=50ms",
                            "--json", str(out), "--plot", str(png))
    assert await bench.run_bench(args) in (0, 1)  # the gate depends on the machine's speed
    report = json.loads(out.read_text())
    assert report["sweep"] == {"parameter": "concurrency", "values": [1, 2, 4]}
    assert [r["load"]["concurrency"] for r in report["runs"]] == [1, 2, 4]
    assert all(r["completed"] == 4 and r["output_tokens"] == 16 for r in report["runs"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "sweep (latencies in ms)" in capsys.readouterr().out


# ---- failures on the client side ----------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_connection_errors_are_counted(tmp_path):
    out = tmp_path / "refused.json"
    args = bench_args(f"http://127.0.0.1:{_closed_port()}", "--num-requests", "3", "--input-len", "4",
                      "--json", str(out))
    assert await bench.run_bench(args) == 0  # no SLO given
    s = json.loads(out.read_text())
    assert s["errors"] == {"connection_error": 3} and s["completed"] == 0


async def test_timeouts_and_the_time_limit(stub_server, tmp_path):
    out = tmp_path / "slow.json"
    args = bench_args(stub_server, "--num-requests", "2", "--concurrency", "2", "--input-len", "4",
                      "--timeout", "0.2", "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["errors"] == {"timeout": 2} and s["stopped_by_time_limit"] is False

    args = bench_args(stub_server, "--num-requests", "5", "--concurrency", "2", "--input-len", "4",
                      "--timeout", "30", "--time-limit", "0.3", "--json", str(out))
    assert await bench.run_bench(args) == 0
    s = json.loads(out.read_text())
    assert s["errors"] == {"time_limit": 2} and s["num_requests"] == 2 and s["stopped_by_time_limit"] is True
