"""tools.fault_gate: the report's pieces, then the whole gate in-process against a real server over the
tiny model with fault injection and a 2 s watchdog, in the test's event loop."""

import json

import pytest

from kvloom.engine.engine import Engine
from kvloom.engine.faults import FaultInjector
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config
from kvloom.tools import fault_gate
from kvloom.tools.cli import build_parser
from kvloom.tools.fault_gate import Outcome, ScenarioResult

pytestmark = pytest.mark.timeout(180)


def gate_args(url: str, *options: str):
    return build_parser().parse_args(["faults", "--url", url, *options])


def test_outcomes_and_the_table():
    assert Outcome("stream_error:engine_unavailable", 0.1).code == "engine_unavailable"
    assert Outcome("http_503:engine_unavailable", 0.1).code == "engine_unavailable"
    assert Outcome("timeout", 30.0).is_hung and Outcome("timeout", 30.0).code is None
    assert Outcome("incomplete_stream", 0.1).code is None and Outcome(None, 0.1).is_ok
    r = ScenarioResult("raise", 10, before_ok=10)
    r.record_during([Outcome(None, 1.0)] * 5 + [Outcome("stream_error:engine_unavailable", 1.0)] * 7
                    + [Outcome("timeout", 30.0)])
    assert (r.during_ok, r.during_errors, r.during_hung, r.during_other) == (5, 7, 1, 0)
    r.expect(r.during_hung == 0, "1 request hung")
    table = fault_gate.results_table([r])
    assert table.splitlines()[1].split()[:4] == ["raise", "10/10", "5/7/1", "engine_unavailable,timeout"]
    assert table.splitlines()[1].endswith("FAIL") and "raise: 1 request hung" in table


def test_usage_errors_exit_2(capsys):
    assert fault_gate.main_from_args(gate_args("http://h:1", "--scenarios", "raise,melt")) == 2
    assert "--scenarios" in capsys.readouterr().err


async def test_a_server_without_fault_injection_is_refused(tiny_llama, capsys):
    served, cleanup = await serve_engine(Engine(tiny_engine_config(tiny_llama)))
    try:
        assert await fault_gate.run_gate(gate_args(served.url)) == 2
    finally:
        await cleanup()
    assert "--enable-fault-injection" in capsys.readouterr().err


async def test_every_scenario_passes_on_the_tiny_model(tiny_llama, tmp_path, capsys):
    faults = FaultInjector()
    engine = Engine(tiny_engine_config(tiny_llama, step_timeout_s=2.0), faults=faults)
    served, cleanup = await serve_engine(engine, enable_admin=True)
    out = tmp_path / "faults.json"
    scenarios = "raise,kill,hang,fail_request,nan_request,fail_warmup"
    try:
        code = await fault_gate.run_gate(gate_args(
            served.url, "--scenarios", scenarios, "--requests", "4", "--load-requests", "8",
            "--row-requests", "12", "--max-tokens", "16", "--timeout", "20", "--json", str(out)))
    finally:
        faults.clear()
        await cleanup()
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert code == 0 and report["passed"], printed
    rows = {r["scenario"]: r for r in report["scenarios"]}
    assert list(rows) == scenarios.split(",")
    for kind in ("raise", "kill", "hang"):
        r = rows[kind]
        assert r["passed"] and r["fired"] and r["during_errors"] > 0 and r["during_hung"] == 0
        assert r["no_restart_errors"] == 4
        assert (r["health"], r["ready"], r["restart"], r["after_ok"]) == (503, 503, 200, 4)
    for kind in ("fail_request", "nan_request"):
        r = rows[kind]
        assert r["passed"] and r["fired"] and (r["during_ok"], r["during_errors"]) == (11, 1)
        assert r["no_restart_ok"] == 4 and (r["health"], r["ready"], r["restart"]) == (200, 200, None)
    r = rows["fail_warmup"]
    assert r["passed"] and (r["fault_restart"], r["health"], r["ready"], r["restart"]) == (503, 200, 503, 200)
    assert engine.num_restarts == 5  # raise, kill, hang, and fail_warmup's two
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scenario"))
    assert [line.split()[0] for line in lines[header + 1:header + 7]] == scenarios.split(",")
    assert all(line.rstrip().endswith("PASS") for line in lines[header + 1:header + 7])
