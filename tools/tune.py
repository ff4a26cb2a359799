"""`kvloom tune`: find the best `kvloom serve` configuration for a workload under latency SLOs.

    kvloom tune STUDY.yaml [--storage sqlite:///tune.db] [--report report.html] [--output best.yaml]
                [--resume]
    kvloom tune report tune.db -o report.html        (any time, also while a study runs)

Data flow:
  STUDY.yaml -> tune_study.load_study -> StudySpec (an invalid file: an error naming the field, exit 2)
  an Optuna study in the storage (its RDB backend: the database opens in optuna-dashboard as it is);
      the spec's objectives, SLOs and knobs are kept as the study's user attributes
  per trial: the sampler (grid, random or TPE) picks knob values -> tune_trial.run_trial (a real
      `kvloom serve`, warm-up, `kvloom bench`, stop) -> tune_score: figures, SLO verdicts, constraints
      -> the trial's user attributes, then told COMPLETE (with its objective values; infeasible when a
      hard SLO fails) or FAIL (with its reason and log tail, never a score)
  the end: the trial table, the best feasible configuration as a `kvloom serve` command line and a
      --output flag file (`kvloom serve --config FILE`), the --report HTML page (tune_report)

Exit code: 0 with a feasible configuration, 1 without one (or when interrupted: 130), 2 for usage errors.
Ctrl-C stops the running trial's server, records that trial as failed ("interrupted") and leaves the
database consistent; `--resume` runs that trial again and then only the missing ones.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from typing import Optional

from kvloom.tools.flag_file import flags_to_argv, write_flag_file
from kvloom.tools.tune_score import (FIGURES, best_trials, constraints, figures_of, is_feasible,
                                     objective_values)
from kvloom.tools.tune_report import STUDY_ATTR
from kvloom.tools.tune_study import StudyError, StudySpec, load_study

INTERRUPTED = "interrupted"


class UsageError(ValueError):
    """A bad command line or a study that does not fit the database: exit code 2."""


def storage_url(value: str) -> str:
    """An Optuna storage URL; a plain file path means SQLite."""
    return value if "://" in value else f"sqlite:///{os.path.abspath(value)}"


def default_work_dir(url: str, study_name: str) -> str:
    """Trial logs and bench reports: beside an SQLite database, else in ./tune-trials."""
    base = "tune-trials"
    if url.startswith("sqlite:///"):
        base = os.path.splitext(url[len("sqlite:///"):])[0] + "-trials"
    return os.path.join(base, study_name)


def study_info(spec: StudySpec) -> dict:
    """What the report and a resumed run need to know about the study, kept in the database."""
    return {
        "model": spec.model, "serve": dict(spec.serve), "knobs": [k.name for k in spec.knobs],
        "workload": dict(spec.workload), "strategy": spec.strategy, "num_trials": spec.num_trials,
        "objectives": [{"figure": o.figure, "direction": o.direction} for o in spec.objectives],
        "slos": [{"name": s.slo.name, "threshold": s.slo.text, "hard": s.is_hard,
                  "threshold_value": s.slo.threshold * (1e3 if s.slo.is_latency else 1.0)}
                 for s in spec.slos],
    }


def make_sampler(spec: StudySpec):
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler for ask-and-tell: its after_trial would call study.stop(), which works only inside
        study.optimize(); the tuner asks sampler.is_exhausted() itself."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    if spec.strategy == "grid":
        return AskTellGridSampler(spec.grid_space(), seed=spec.seed)
    if spec.strategy == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, constraints_func=lambda t: t.user_attrs["constraints"])


def open_study(spec: StudySpec, url: str, resume: bool):
    import optuna

    storage = optuna.storages.RDBStorage(url)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if spec.name in names and not resume:
        raise UsageError(f"study {spec.name!r} already exists in {url}: pass --resume to continue it, "
                         "or give the study another name")
    if spec.name not in names and resume:
        raise UsageError(f"--resume: no study {spec.name!r} in {url}")
    study = optuna.create_study(storage=storage, study_name=spec.name, sampler=make_sampler(spec),
                                directions=[o.direction for o in spec.objectives], load_if_exists=resume)
    info = study_info(spec)
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        study.set_user_attr(STUDY_ATTR, info)
    else:
        for key in ("knobs", "objectives", "strategy"):
            if stored[key] != info[key]:
                raise UsageError(f"--resume: the study file's {key} differ from those of the stored study")
    return study, storage


def storage_trial_id(study, storage, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                           number)


def _trial_finished(trial) -> bool:
    """Counts against the budget: completed, or failed for any reason but an interruption."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("failure") != INTERRUPTED)


def requeue_interrupted(study, storage) -> int:
    """Enqueue the knobs of interrupted trials that were neither run again nor queued already. A trial
    still RUNNING belongs to a tuner that was killed (one tuner runs a study): it is failed as
    interrupted first."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage_trial_id(study, storage, t.number)
        storage.set_trial_user_attr(trial_id, "status", "failed")
        storage.set_trial_user_attr(trial_id, "failure", INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    pending = (TrialState.WAITING, TrialState.RUNNING)
    done = [t.system_attrs.get("fixed_params", t.params) for t in trials  # a WAITING trial's knobs
            if _trial_finished(t) or t.state in pending]
    count = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("failure") == INTERRUPTED and t.params not in done:
            study.enqueue_trial(t.params)
            done.append(t.params)
            count += 1
    return count


def serve_flags_of(spec: StudySpec, knobs: dict) -> dict:
    return {**({"model": spec.model} if spec.model else {}), **spec.serve, **knobs}


def serve_command(flags: dict) -> str:
    return shlex.join(["kvloom", "serve", *flags_to_argv(flags)])


def record_run(trial, run, spec: StudySpec) -> Optional[list[float]]:
    """Store a finished run on the trial; its objective values, or None when it failed."""
    trial.set_user_attr("warmup_s", run.warmup_s)
    trial.set_user_attr("bench_s", run.bench_s)
    trial.set_user_attr("server_pid", run.server_pid)
    trial.set_user_attr("log_path", run.log_path)
    if run.is_ok:
        try:
            figures, verdicts, load = figures_of(run.report, spec.slos)
            values = objective_values(figures, spec.objectives)
        except ValueError as exc:
            run.is_ok, run.reason = False, str(exc)
    if not run.is_ok:
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("failure", run.reason)
        trial.set_user_attr("log_tail", run.log_tail[-4000:])
        return None
    for name, value in figures.items():
        trial.set_user_attr(name, value)
    feasible = is_feasible(verdicts)
    trial.set_user_attr("load", load)
    trial.set_user_attr("slos", verdicts)
    trial.set_user_attr("constraints", constraints(verdicts))
    trial.set_user_attr("feasible", feasible)
    trial.set_user_attr("status", "ok" if feasible else "infeasible")
    if run.report.get("runs"):
        trial.set_user_attr("points", [{"label": p.get("label"), "passed": p.get("passed"),
                                        "output_throughput": p.get("output_throughput")}
                                       for p in run.report["runs"]])
    return values


def on_server(trial, pid: int) -> None:
    from tqdm import tqdm

    trial.set_user_attr("server_pid", pid)
    tqdm.write(f"trial {trial.number}: kvloom serve started, pid {pid}: {trial.user_attrs['serve_command']}",
               file=sys.stderr)


def _progress(total: int, desc: str, show: bool, **options):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not show, dynamic_ncols=True, **options)


async def run_study(spec: StudySpec, study, storage, work_dir: str, show_progress: bool) -> None:
    """Trials until the budget (trials, wall time) is spent or a grid is exhausted."""
    from optuna.trial import TrialState
    from tqdm import tqdm

    from kvloom.tools.tune_report import format_trial_line
    from kvloom.tools.tune_trial import run_trial

    requeued = requeue_interrupted(study, storage)
    num_done = sum(_trial_finished(t) for t in study.get_trials(deepcopy=False))
    if requeued:
        tqdm.write(f"kvloom tune: running {requeued} interrupted trial(s) again", file=sys.stderr)
    started = time.monotonic()
    bar = _progress(spec.num_trials, f"study {spec.name}", show_progress, initial=num_done, unit="trial")
    try:
        while num_done < spec.num_trials:
            if spec.wall_time_s is not None and time.monotonic() - started >= spec.wall_time_s:
                tqdm.write(f"kvloom tune: wall time budget spent after {num_done} trials", file=sys.stderr)
                break
            if spec.strategy == "grid" and study.sampler.is_exhausted(study) and not any(
                    t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
                break
            trial = study.ask()
            knobs = {knob.name: knob.suggest(trial) for knob in spec.knobs}
            flags = serve_flags_of(spec, knobs)
            trial.set_user_attr("knobs", knobs)
            trial.set_user_attr("serve_command", serve_command(flags))
            bench_argv = flags_to_argv(spec.workload) + (["--slo", spec.bench_slo_spec] if spec.slos else [])
            phases = _progress(4, f"trial {trial.number}", show_progress, leave=False,
                               bar_format="{desc} {elapsed}")
            try:
                run = await run_trial(flags_to_argv(flags), bench_argv,
                                      os.path.join(work_dir, f"trial-{trial.number}"),
                                      warmup_timeout_s=spec.warmup_timeout_s,
                                      bench_timeout_s=spec.bench_timeout_s,
                                      stop_timeout_s=spec.stop_timeout_s,
                                      on_phase=lambda phase: phases.set_description_str(
                                          f"trial {trial.number}: {phase}"),
                                      on_server=lambda pid: on_server(trial, pid))
            except asyncio.CancelledError:
                trial.set_user_attr("status", "failed")
                trial.set_user_attr("failure", INTERRUPTED)
                study.tell(trial, state=TrialState.FAIL)
                raise
            finally:
                phases.close()
            values = record_run(trial, run, spec)
            if values is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                storage.set_trial_system_attr(storage_trial_id(study, storage, trial.number), "constraints",
                                              tuple(trial.user_attrs["constraints"]))
                study.tell(trial, values)
            num_done += 1
            bar.update(1)
            tqdm.write(format_trial_line(study.trials[trial.number], study_info(spec)), file=sys.stderr)
    finally:
        bar.close()


def summarize(study, spec: StudySpec, output: Optional[str]) -> int:
    """Print the trial table and the best configuration; write --output. The exit code."""
    from kvloom.tools.tune_report import format_table

    info = study_info(spec)
    trials = study.get_trials(deepcopy=False)
    print(format_table(trials, info))
    best = best_trials(trials, spec.objectives)
    if not best:
        print(f"\nkvloom tune: no feasible configuration: no completed trial meets every hard SLO "
              f"({', '.join(s['name'] for s in info['slos'] if s['hard']) or 'none'})")
        return 1
    label = "best feasible configuration" if len(best) == 1 else "Pareto front of feasible configurations"
    print(f"\nkvloom tune: {label} ({', '.join(o.text for o in spec.objectives)}):")
    for t in best:
        figures = ", ".join(f"{o.figure}={t.values[i]:.4g}" for i, o in enumerate(spec.objectives))
        command = serve_command(serve_flags_of(spec, t.user_attrs["knobs"]))
        print(f"  trial {t.number}: {figures}\n    {command}")
    if output:
        chosen = best[0]
        flags = {k: v for k, v in serve_flags_of(spec, chosen.user_attrs["knobs"]).items() if v is not None}
        write_flag_file(output, flags,
                        f"kvloom serve --config {os.path.basename(output)}: trial {chosen.number} of study "
                        f"{spec.name}\n({', '.join(o.text for o in spec.objectives)}; every hard SLO met)")
        print(f"kvloom tune: wrote {output} (kvloom serve --config {output})")
    return 0


def main_report(args) -> int:
    from kvloom.tools.tune_report import load_report_study, write_report

    if not args.database:
        raise UsageError("kvloom tune report DB -o report.html: the database is missing")
    output = args.report or "report.html"
    try:
        study, info = load_report_study(storage_url(args.database), args.study_name)
        write_report(output, study, info, x=args.x, y=args.y)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"kvloom tune: report written to {output}")
    return 0


def main_tune(args) -> int:
    for name, value in (("--x", args.x), ("--y", args.y)):
        if value not in FIGURES:  # before the study runs, not when its report is written
            raise UsageError(f"{name}: unknown figure {value!r}; figures: {', '.join(FIGURES)}")
    spec = load_study(args.study)
    url = storage_url(args.storage)
    study, storage = open_study(spec, url, args.resume)
    work_dir = args.work_dir or default_work_dir(url, spec.name)
    print(f"kvloom tune: study {spec.name!r} in {url} ({spec.strategy}, {spec.num_trials} trials; "
          f"live view: optuna-dashboard {url})", file=sys.stderr)
    try:
        asyncio.run(run_study(spec, study, storage, work_dir, not args.no_progress))
    except KeyboardInterrupt:
        print(f"\nkvloom tune: interrupted; the database is consistent. Continue with: "
              f"kvloom tune {args.study} --storage {args.storage} --resume", file=sys.stderr)
        return 130
    code = summarize(study, spec, args.output)
    if args.report:
        from kvloom.tools.tune_report import write_report

        write_report(args.report, study, study_info(spec), x=args.x, y=args.y)
        print(f"kvloom tune: report written to {args.report}")
    return code


def main_from_args(args) -> int:
    try:
        return main_report(args) if args.study == "report" else main_tune(args)
    except (StudyError, UsageError) as exc:
        print(f"kvloom tune: error: {exc}", file=sys.stderr)
        return 2
