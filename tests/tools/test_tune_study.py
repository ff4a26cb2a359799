"""`kvloom tune` without servers: the study file's validation, flag files and `kvloom serve --config`, and
the scoring rules (SLOs are constraints; a failed or infeasible trial is never best)."""

from types import SimpleNamespace

import pytest
import yaml

from kvloom.tools.cli import build_parser, main
from kvloom.tools.flag_file import expand_config_argv, flags_to_argv, write_flag_file
from kvloom.tools.slo import parse_slos
from kvloom.tools.tune_score import (Objective, TunedSLO, best_trials, constraints, figures_of, is_feasible,
                                     objective_values)
from kvloom.tools.tune_study import StudyError, load_study, parse_study

pytestmark = pytest.mark.timeout(120)

VALID = {
    "name": "unit",
    "serve": {"num-pages": 64},
    "knobs": {"chunk-size": [32, 64], "max-running": {"low": 2, "high": 6, "step": 2},
              "no-prefix-cache": [False, True]},
    "workload": {"input-len": 16, "output-len": 4, "num-requests": 4},
    "slos": {"e2e_p90": "2s", "ttft_p99": {"max": "500ms", "hard": False}},
    "objectives": ["maximize output_throughput"],
    "strategy": "grid",
}


def study(**changes):
    data = {**VALID, **changes}
    return parse_study({k: v for k, v in data.items() if v is not None})


def test_a_valid_study():
    spec = study()
    assert [k.name for k in spec.knobs] == ["chunk-size", "max-running", "no-prefix-cache"]
    assert spec.grid_space() == {"chunk-size": [32, 64], "max-running": [2, 4, 6],
                                 "no-prefix-cache": [False, True]}
    assert spec.num_trials == 12  # the grid's size when no budget is given
    assert [(s.slo.name, s.is_hard) for s in spec.slos] == [("e2e_p90", True), ("ttft_p99", False)]
    assert spec.bench_slo_spec == "e2e_p90=2s,ttft_p99=500ms"
    assert spec.objectives == (Objective("output_throughput", "maximize"),)
    assert spec.warmup_timeout_s == 600 and spec.bench_timeout_s == 600


@pytest.mark.parametrize("changes, field", [
    ({"knobs": {"chunk-sise": [32]}}, "knobs.chunk-sise"),
    ({"knobs": {"chunk-size": ["big"]}}, "knobs.chunk-size[0]"),
    ({"knobs": {"chunk-size": {"low": 64, "high": 32}}}, "knobs.chunk-size.high"),
    ({"knobs": {"chunk-size": {"high": 32}}}, "knobs.chunk-size.low"),
    ({"knobs": {"no-prefix-cache": {"low": 0, "high": 1}}}, "knobs.no-prefix-cache"),
    ({"knobs": {"policy": ["fcfs", "random"]}}, "knobs.policy[1]"),
    ({"knobs": {"port": [1, 2]}}, "knobs.port"),
    ({"knobs": {}}, "knobs"),
    ({"serve": {"chunk-size": 32}}, "knobs.chunk-size"),
    ({"serve": {"num-pages": "many"}}, "serve.num-pages"),
    ({"workload": {"input-lenght": 16}}, "workload.input-lenght"),
    ({"workload": {"num-requests": 0}}, "workload"),
    ({"workload": {"url": "http://x"}}, "workload.url"),
    ({"slos": {"e2e_p90": "2"}}, "slos.e2e_p90"),
    ({"slos": {"latency": "2s"}}, "slos.latency"),
    ({"slos": {"e2e_p90": {"max": "2s", "hard": "yes"}}}, "slos.e2e_p90.hard"),
    ({"objectives": ["maximise output_throughput"]}, "objectives[0]"),
    ({"objectives": ["maximize speed"]}, "objectives[0]"),
    ({"objectives": None}, "objectives"),
    ({"strategy": "annealing"}, "strategy"),
    ({"strategy": "random"}, "budget.trials"),
    ({"budget": {"trials": 13}}, "budget.trials"),
    ({"budget": {"trials": 2, "wall_time": "soon"}}, "budget.wall_time"),
    ({"timeouts": {"warmup": -1}}, "timeouts.warmup"),
    ({"timeouts": {"warm_up": 10}}, "timeouts.warm_up"),
    ({"knob": {}}, "knob"),
])
def test_an_invalid_study_names_the_field(changes, field):
    with pytest.raises(StudyError) as info:
        study(**changes)
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_a_float_range_needs_a_step_for_the_grid():
    with pytest.raises(StudyError, match=r"^knobs.kv-memory-fraction: the grid strategy needs"):
        study(knobs={"kv-memory-fraction": {"low": 0.1, "high": 0.5}})
    spec = study(knobs={"kv-memory-fraction": {"low": 0.1, "high": 0.5, "log": True}}, strategy="bayesian",
                 budget={"trials": 3, "wall_time": "1.5h"})
    assert spec.knobs[0].kind == "float" and spec.wall_time_s == 5400


def test_load_study_names_the_file(tmp_path):
    with pytest.raises(StudyError, match="not YAML"):
        path = tmp_path / "bad.yaml"
        path.write_text("knobs: [unclosed")
        load_study(str(path))
    path = tmp_path / "my-study.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in VALID.items() if k != "name"}))
    assert load_study(str(path)).name == "my-study"


def test_flag_files_and_serve_config(tmp_path):
    assert flags_to_argv({"page-size": 8, "no-prefix-cache": True, "policy": None, "x": False}) == [
        "--page-size", "8", "--no-prefix-cache"]
    path = str(tmp_path / "best.yaml")
    write_flag_file(path, {"page-size": 8, "chunk-size": 64, "no-prefix-cache": True}, "a comment")
    argv = expand_config_argv(["serve", "--config", path, "--chunk-size", "128"])
    assert argv == ["serve", "--page-size", "8", "--chunk-size", "64", "--no-prefix-cache",
                    "--chunk-size", "128"]
    args = build_parser().parse_args(argv)
    assert (args.page_size, args.chunk_size, args.no_prefix_cache) == (8, 128, True)  # the command line wins
    assert expand_config_argv(["bench", "--config", path]) == ["bench", "--config", path]


def test_serve_config_errors_name_the_entry(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("--page-size: 8\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "--page-size" in capsys.readouterr().err


# ---- scoring ---------------------------------------------------------------------------------------

SLOS = (TunedSLO(parse_slos("e2e_p90=100ms")[0]), TunedSLO(parse_slos("ttft_p99=10ms")[0], is_hard=False))


def summary(e2e_p90, ttft_p99, throughput, label="c=1"):
    def verdict(name, threshold, measured):
        return {"name": name, "threshold": f"{threshold:g}ms", "unit": "ms", "threshold_value": threshold,
                "measured": measured, "passed": measured is not None and measured <= threshold,
                "violation_rate": None if measured is None else float(measured > threshold)}
    return {"label": label, "output_throughput": throughput, "error_rate": 0.0,
            "e2e_ms": {"p90": e2e_p90}, "ttft_ms": {"p99": ttft_p99},
            "slos": [verdict("e2e_p90", 100, e2e_p90), verdict("ttft_p99", 10, ttft_p99)]}


def test_a_hard_slo_is_a_constraint_and_a_soft_one_is_only_reported():
    figures, verdicts, _ = figures_of(summary(80, 50, 10.0), SLOS)
    assert figures["e2e_p90"] == 80 and figures["output_throughput"] == 10.0
    assert is_feasible(verdicts) and constraints(verdicts) == [-20.0]  # the soft SLO failed: still feasible
    assert [v["hard"] for v in verdicts] == [True, False] and not verdicts[1]["passed"]
    _, verdicts, _ = figures_of(summary(130, 5, 10.0), SLOS)
    assert not is_feasible(verdicts) and constraints(verdicts) == [30.0]  # violated: positive
    _, verdicts, _ = figures_of(summary(None, None, 0.0), SLOS)
    assert not is_feasible(verdicts) and constraints(verdicts)[0] > 0  # nothing measured: violated


def test_a_sweep_speaks_through_its_most_loaded_feasible_point():
    report = {"runs": [summary(50, 5, 10.0, "c=1"), summary(90, 5, 30.0, "c=4"),
                       summary(200, 5, 40.0, "c=8")]}
    figures, verdicts, label = figures_of(report, SLOS)
    assert (label, figures["output_throughput"], is_feasible(verdicts)) == ("c=4", 30.0, True)
    report = {"runs": [summary(150, 5, 10.0, "c=1"), summary(200, 5, 40.0, "c=8")]}
    assert figures_of(report, SLOS)[2] == "c=1" and not is_feasible(figures_of(report, SLOS)[1])


def test_an_unmeasured_objective_is_an_error_not_a_score():
    with pytest.raises(ValueError, match="e2e_p90 was not measured"):
        objective_values({"e2e_p90": None}, [Objective("e2e_p90", "minimize")])


def trial(number, values, feasible=True):
    return SimpleNamespace(number=number, values=values, user_attrs={"feasible": feasible} if values else {})


def test_failed_and_infeasible_trials_are_never_best():
    maximize = [Objective("output_throughput", "maximize")]
    trials = [trial(0, None), trial(1, [500.0], feasible=False), trial(2, [100.0]), trial(3, [120.0])]
    assert [t.number for t in best_trials(trials, maximize)] == [3]
    assert best_trials([trial(0, None), trial(1, [500.0], feasible=False)], maximize) == []
    minimize = [Objective("e2e_p90", "minimize")]
    assert [t.number for t in best_trials(trials, minimize)] == [2]


def test_two_objectives_give_the_feasible_pareto_front():
    objectives = [Objective("output_throughput", "maximize"), Objective("e2e_p90", "minimize")]
    trials = [trial(0, [100.0, 50.0]), trial(1, [200.0, 80.0]), trial(2, [90.0, 60.0]),
              trial(3, [300.0, 10.0], feasible=False)]
    assert [t.number for t in best_trials(trials, objectives)] == [1, 0]  # 2 is dominated by 0


def test_serve_fault_at_start_names_a_bad_kind(capsys):
    assert main(["serve", "--fault-at-start", "nope", "--compile-cache", ""]) == 2
    assert "--fault-at-start: kind: must be one of" in capsys.readouterr().err


# ---- the study database and the report, without servers ------------------------------------------

def bench_report(e2e_p90_ms, throughput):
    return {"label": "c=1", "output_throughput": throughput, "error_rate": 0.0, "completed": 4,
            "e2e_ms": {"p90": e2e_p90_ms}, "ttft_ms": {"p99": 5.0},
            "slos": [{"name": "e2e_p90", "threshold": "2s", "unit": "ms", "threshold_value": 2000.0,
                      "measured": e2e_p90_ms, "passed": e2e_p90_ms <= 2000, "violation_rate": 0.0},
                     {"name": "ttft_p99", "threshold": "500ms", "unit": "ms", "threshold_value": 500.0,
                      "measured": 5.0, "passed": True, "violation_rate": 0.0}]}


def test_trials_recorded_in_the_database_and_the_report():
    import optuna
    from optuna.trial import TrialState

    from kvloom.tools.tune import record_run, study_info
    from kvloom.tools.tune_report import format_table, report_html
    from kvloom.tools.tune_trial import TrialRun

    spec = study(strategy="random", budget={"trials": 3})
    study_db = optuna.create_study(directions=["maximize"])
    runs = [TrialRun(True, report=bench_report(900.0, 50.0), warmup_s=3.0),
            TrialRun(True, report=bench_report(2500.0, 80.0), warmup_s=3.0),  # faster but over the hard SLO
            TrialRun(False, reason="warm-up timed out after 60 s", log_tail="kvloom: listening")]
    for run in runs:
        trial = study_db.ask()
        knobs = {k.name: k.suggest(trial) for k in spec.knobs}
        trial.set_user_attr("knobs", knobs)
        values = record_run(trial, run, spec)
        study_db.tell(trial, values, state=TrialState.COMPLETE if values else TrialState.FAIL)
    ok, infeasible, failed = study_db.trials
    assert (ok.user_attrs["feasible"], infeasible.user_attrs["feasible"]) == (True, False)
    assert ok.user_attrs["constraints"] == [-1100.0] and infeasible.user_attrs["constraints"] == [500.0]
    assert failed.state == TrialState.FAIL and failed.values is None
    assert failed.user_attrs["failure"] == "warm-up timed out after 60 s"
    info = study_info(spec)
    table = format_table(study_db.trials, info)
    assert "2500!" in table and "warm-up timed out after 60 s" in table and "e2e_p90 > 2s" in table
    page = report_html(study_db, info)
    assert "SLO e2e_p90 ≤ 2s (hard)" in page and "SLO ttft_p99 ≤ 500ms (soft)" in page
    assert "infeasible (hard SLO failed): 1" in page and "failed (no figures): 1" in page
    assert "best: trial 0" in page  # the infeasible trial's higher throughput does not count
    with pytest.raises(ValueError, match="--y: unknown figure"):
        report_html(study_db, info, y="latency")


def test_resume_requeues_interrupted_trials_and_fails_those_a_killed_tuner_left_running():
    import optuna
    from optuna.trial import TrialState

    from kvloom.tools.tune import INTERRUPTED, requeue_interrupted

    storage = optuna.storages.InMemoryStorage()
    study_db = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    done = study_db.ask({"x": optuna.distributions.IntDistribution(0, 1000)})
    study_db.tell(done, 1.0)
    interrupted = study_db.ask({"x": optuna.distributions.IntDistribution(0, 1000)})
    interrupted.set_user_attr("failure", INTERRUPTED)
    study_db.tell(interrupted, state=TrialState.FAIL)
    left_running = study_db.ask({"x": optuna.distributions.IntDistribution(0, 1000)})  # its tuner was killed

    assert requeue_interrupted(study_db, storage) == 2
    trials = study_db.get_trials()
    assert trials[left_running.number].state == TrialState.FAIL
    assert trials[left_running.number].user_attrs["failure"] == INTERRUPTED
    waiting = [t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING]
    assert waiting == [interrupted.params, left_running.params]
    assert requeue_interrupted(study_db, storage) == 0  # queued once only
