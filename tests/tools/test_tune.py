"""`kvloom tune` end to end on the tiny model: real `kvloom serve` subprocesses per trial, a real
`kvloom bench`, the Optuna database, the HTML report in headless Chromium, optuna-dashboard's HTTP API.

Trials are kept cheap: knobs that leave the compiled step shapes alone (policy, prefix cache), a few
short requests, the shared JAX compile cache."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import optuna
import pytest
import yaml

from kvloom.tools.cli import build_parser
from kvloom.tools.flag_file import expand_config_argv
from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(1200)

CHROMIUM = "/usr/bin/chromium"
SERVE = {"max-model-len": 256, "page-size": 4, "num-pages": 256, "chunk-size": 32, "max-tokens-per-step": 64,
         "max-prefill-seqs": 2, "max-running": 2, "compile-cache": _JAX_CACHE, "drain-timeout": 5}
WORKLOAD = {"input-len": 16, "output-len": 4, "num-requests": 4, "concurrency": 2, "vocab-size": 384,
            "ignore-eos": True, "shared-prefix-ratio": 0.5}


def write_study(path, model, **fields):
    serve = {**SERVE, **fields.pop("serve", {})}
    data = {"model": model, "serve": serve, "workload": WORKLOAD, "strategy": "grid",
            "objectives": ["maximize output_throughput"],
            "timeouts": {"warmup": "8m", "bench": "3m", "stop": "30s"}, **fields}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def tune_argv(*args):
    return [sys.executable, "-m", "kvloom.tools.cli", "tune", *args, "--no-progress"]


# `kvloom tune` with Ctrl-C restored: a pytest-xdist worker ignores SIGINT, and an ignored signal stays
# ignored across exec, so without this the tuner would never see KeyboardInterrupt under -n 2.
CTRL_C_TUNE = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "from kvloom.tools.cli import main; sys.exit(main(sys.argv[1:]))")


def run_tune(*args, cwd):
    return subprocess.run(tune_argv(*args), cwd=cwd, capture_output=True, text=True, timeout=1100)


def trials_of(db, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials()


@pytest.fixture(scope="module")
def grid_study(tiny_llama, tmp_path_factory):
    """A 2-knob grid of 4 trials with one hard SLO, run once for the tests below."""
    root = tmp_path_factory.mktemp("grid")
    study = write_study(root / "grid.yaml", tiny_llama, name="grid",
                        knobs={"policy": ["fcfs", "lpm"], "no-prefix-cache": [False, True]},
                        slos={"e2e_p90": "60s", "ttft_p99": {"max": "1us", "hard": False}})
    result = run_tune(study, "--storage", str(root / "tune.db"), "--report", str(root / "report.html"),
                      "--output", str(root / "best.yaml"), cwd=root)
    return root, result


def test_a_grid_of_four_trials_under_a_hard_slo(grid_study):
    root, result = grid_study
    assert result.returncode == 0, result.stdout + result.stderr
    trials = trials_of(root / "tune.db", "grid")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted((t.params["policy"], t.params["no-prefix-cache"]) for t in trials) == [
        ("fcfs", False), ("fcfs", True), ("lpm", False), ("lpm", True)]
    for t in trials:
        attrs = t.user_attrs
        assert attrs["feasible"] is True and attrs["status"] == "ok"
        assert attrs["completed"] == 4 and attrs["output_throughput"] > 0 and t.values == [
            attrs["output_throughput"]]
        assert 0 < attrs["e2e_p90"] < 60_000 and attrs["ttft_p50"] is not None and attrs["warmup_s"] > 0
        assert attrs["knobs"] == t.params
        assert ("--no-prefix-cache" in attrs["serve_command"].split()) == t.params["no-prefix-cache"]
        verdicts = {v["name"]: v for v in attrs["slos"]}
        assert verdicts["e2e_p90"]["passed"] and verdicts["e2e_p90"]["hard"]
        assert not verdicts["ttft_p99"]["passed"] and not verdicts["ttft_p99"]["hard"]  # soft: reported
        assert verdicts["ttft_p99"]["violation_rate"] == 1.0
        assert t.system_attrs["constraints"][0] <= 0 and len(t.system_attrs["constraints"]) == 1
    best = max(trials, key=lambda t: t.values[0])
    assert (f"best feasible configuration (maximize output_throughput):\n  trial {best.number}"
            in result.stdout)
    assert best.user_attrs["serve_command"] in result.stdout


def test_the_best_configuration_is_a_serve_config_file(grid_study):
    root, result = grid_study
    best = yaml.safe_load((root / "best.yaml").read_text())
    args = build_parser().parse_args(expand_config_argv(["serve", "--config", str(root / "best.yaml"),
                                                         "--policy", "fcfs"]))
    assert args.model == best["model"] and args.max_running == 2 and args.page_size == 4
    assert args.no_prefix_cache is best.get("no-prefix-cache", False)
    assert args.policy == "fcfs"  # the command line overrides the file


def test_the_report_renders_in_headless_chromium(grid_study, tmp_path):
    if shutil.which(CHROMIUM) is None and os.environ.get("CI"):
        pytest.fail("chromium is missing in CI: tools/ci_chromium.sh installs it")
    if shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    root, _ = grid_study
    rebuilt = tmp_path / "rebuilt.html"  # `kvloom tune report` rebuilds the page from the database alone
    result = run_tune("report", str(root / "tune.db"), "-o", str(rebuilt), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for page_path in (root / "report.html", rebuilt):
        errors = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page()
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(page_path.as_uri())
                page.wait_for_selector("#plot-0 .main-svg")
                texts = page.locator(".annotation-text").all_text_contents()
                dashed = page.eval_on_selector_all(
                    ".shapelayer path", "els => els.filter(e => e.style.stroke === 'rgb(255, 0, 0)' && "
                                        "e.style.strokeDasharray).length")
                legend = page.locator("#plot-0 .legendtext").all_text_contents()
                table_rows = page.locator("#trials tbody tr").count()
                page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            finally:
                browser.close()
        assert errors == []
        assert any(t.startswith("SLO e2e_p90 ≤ 60s (hard)") for t in texts), texts
        assert any(t.startswith("SLO ttft_p99 ≤ 1us (soft)") for t in texts), texts
        assert dashed >= 2  # e2e_p90 on the main scatter, ttft_p99 on its own
        assert "best" in legend and "feasible: 4" in legend and "failed (no figures): 0" in legend
        assert table_rows == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_optuna_dashboard_finds_the_study_and_its_trials(grid_study):
    root, _ = grid_study
    dashboard = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        dashboard, f"sqlite:///{root / 'tune.db'}", "--host", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def studies():
                while True:  # until the server accepts connections (or the process dies)
                    assert proc.returncode is None, "optuna-dashboard exited"
                    try:
                        async with session.get(url + "/api/studies") as resp:
                            return await resp.json()
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.2)

            listed = (await asyncio.wait_for(studies(), 120))["study_summaries"]
            assert [s["study_name"] for s in listed] == ["grid"]
            async with session.get(f"{url}/api/studies/{listed[0]['study_id']}?after=0") as resp:
                detail = await resp.json()
        assert len(detail["trials"]) == 4
        attrs = {a["key"] for a in detail["trials"][0]["user_attrs"]}
        assert {"output_throughput", "e2e_p90", "ttft_p99", "slos", "knobs", "feasible"} <= attrs
    finally:
        proc.terminate()
        await proc.wait()


def test_a_failed_warmup_is_recorded_and_an_slo_nobody_meets_gives_no_configuration(tiny_llama, tmp_path):
    study = write_study(tmp_path / "fail.yaml", tiny_llama, name="fail",
                        knobs={"fault-at-start": ["fail_warmup", None]}, slos={"e2e_p50": "1us"})
    result = run_tune(study, "--storage", str(tmp_path / "tune.db"), "--output", str(tmp_path / "best.yaml"),
                      cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no feasible configuration" in result.stdout
    assert not (tmp_path / "best.yaml").exists()
    trials = {t.params["fault-at-start"]: t for t in trials_of(tmp_path / "tune.db", "fail")}
    failed, ran = trials["fail_warmup"], trials[None]  # the grid's order is the sampler's
    assert failed.state == optuna.trial.TrialState.FAIL and failed.values is None
    assert failed.user_attrs["failure"].startswith(
        "the engine did not become ready: degraded (warm-up failed")
    assert "InjectedFault" in failed.user_attrs["log_tail"]
    assert ran.state == optuna.trial.TrialState.COMPLETE  # the study carried on
    assert ran.user_attrs["feasible"] is False and ran.user_attrs["status"] == "infeasible"
    assert ran.system_attrs["constraints"][0] > 0


async def test_resume_after_an_interruption_runs_only_the_missing_trials(tiny_llama, tmp_path):
    study = write_study(tmp_path / "resume.yaml", tiny_llama, name="resume",
                        knobs={"policy": ["fcfs", "lpm"]}, slos={"error_rate": "0%"})
    db = tmp_path / "tune.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CTRL_C_TUNE, *tune_argv(study, "--storage", str(db))[3:], cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines = []
    try:
        async def second_server_pid():
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "kvloom tune exited early:\n" + "".join(lines)
                lines.append(line)
                if line.startswith("trial 1: kvloom serve started, pid "):
                    return int(line.split("pid ", 1)[1].split(":")[0])

        pid = await asyncio.wait_for(second_server_pid(), 900)
        proc.send_signal(signal.SIGINT)  # as Ctrl-C would, while trial 1's server starts
        assert await asyncio.wait_for(proc.wait(), 120) == 130
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the running server was stopped
    done, interrupted = trials_of(db, "resume")
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert interrupted.user_attrs["failure"] == "interrupted"

    result = run_tune(study, "--storage", str(db), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = trials_of(db, "resume")
    assert len(trials) == 3  # one new trial: the interrupted one, run again; trial 0 was not repeated
    assert trials[2].state == optuna.trial.TrialState.COMPLETE and trials[2].params == interrupted.params
    assert result.stderr.count("kvloom serve started") == 1
