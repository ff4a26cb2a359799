"""The study file of `kvloom tune`: YAML in, a validated, frozen `StudySpec` out.

    name: chat-tuning            # the study's name in the database (default: the file's stem)
    model: null                  # checkpoint directory or .gguf; null: the default model
    serve:                       # kvloom serve flags fixed for every trial
      num-pages: 2048
    knobs:                       # kvloom serve flags to tune: a list of choices or a range
      chunk-size: [64, 128, 256]
      max-running: {low: 4, high: 32, step: 4}
      kv-memory-fraction: {low: 0.1, high: 0.5, log: true}
      no-prefix-cache: [false, true]
    workload:                    # kvloom bench flags (--url, --json, --slo are the tuner's)
      api: chat
      shared-prefix-ratio: 0.5
      concurrency: 8
      num-requests: 64
    slos:                        # any bench figure; hard unless `hard: false`
      e2e_p90: 4s
      ttft_p99: {max: 1s, hard: false}
    objectives: [maximize output_throughput]     # one, or two for a Pareto front
    strategy: {name: bayesian, seed: 0}          # grid | random | bayesian
    budget: {trials: 12, wall_time: 2h}
    timeouts: {warmup: 10m, bench: 10m, stop: 30s}

Every error is a `StudyError` whose message starts with the field at fault (`knobs.chunk-size.low: ...`).
Flag names and value types are checked against the real `kvloom serve` and `kvloom bench` parsers.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kvloom.tools.command_args import UsageError, add_bench_args
from kvloom.tools.flag_file import FlagFileError, flags_to_argv, read_yaml
from kvloom.tools.serve_args import serve_parser
from kvloom.tools.slo import parse_slos
from kvloom.tools.tune_score import FIGURES, Objective, TunedSLO

STRATEGIES = ("grid", "random", "bayesian")
TUNER_SERVE_FLAGS = ("host", "port", "model")  # set by the tuner (model: the study's top-level field)
TUNER_BENCH_FLAGS = ("url", "json", "slo", "plot", "no-progress")
_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)\s*(s|m|h)?$")
_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class StudyError(ValueError):
    """An invalid study file; the message starts with the field at fault."""


@dataclass(frozen=True)
class Flag:
    """One long flag of a parser: its name without dashes, and what it takes."""

    name: str
    kind: str  # "bool" (store_true), "int", "float" or "str"
    choices: Optional[tuple] = None


@dataclass(frozen=True)
class Knob:
    name: str  # the serve flag, without dashes
    kind: str
    choices: Optional[tuple] = None  # a categorical knob; None in it: the flag is not given
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False

    def grid_values(self) -> list:
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise StudyError(f"knobs.{self.name}: the grid strategy needs choices or a step")
        count = int(round((self.high - self.low) / self.step)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def suggest(self, trial) -> Any:
        """The trial's value, drawn by the study's sampler."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class StudySpec:
    name: str
    model: Optional[str]
    serve: Mapping[str, Any]
    knobs: tuple[Knob, ...]
    workload: Mapping[str, Any]
    slos: tuple[TunedSLO, ...]
    objectives: tuple[Objective, ...]
    strategy: str
    seed: int
    num_trials: int
    wall_time_s: Optional[float]
    warmup_timeout_s: float
    bench_timeout_s: float
    stop_timeout_s: float

    def grid_space(self) -> dict:
        return {knob.name: knob.grid_values() for knob in self.knobs}

    @property
    def bench_slo_spec(self) -> Optional[str]:
        """Every SLO, hard and soft, as `kvloom bench --slo` takes them: bench reports each verdict."""
        return ",".join(f"{s.slo.name}={s.slo.text}" for s in self.slos) or None


# ---- parsers of the real commands ------------------------------------------------------------------

def parser_flags(parser: argparse.ArgumentParser) -> dict[str, Flag]:
    """The long flags of `parser` by name without dashes."""
    flags = {}
    for action in parser._actions:  # argparse keeps its actions here; there is no public list
        for option in action.option_strings:
            if not option.startswith("--") or option == "--help":
                continue
            if action.nargs == 0:
                kind = "bool"
            else:
                kind = {int: "int", float: "float"}.get(action.type, "str")
            flags[option[2:]] = Flag(option[2:], kind, tuple(action.choices) if action.choices else None)
    return flags


def serve_flags() -> dict[str, Flag]:
    return {name: flag for name, flag in parser_flags(serve_parser()).items() if name != "config"}


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom bench")
    add_bench_args(parser)
    return parser


# ---- values -----------------------------------------------------------------------------------------

def parse_duration(value: Any, field: str) -> float:
    """A number of seconds, or text such as 90s, 10m, 1.5h."""
    if isinstance(value, bool):
        raise StudyError(f"{field}: expected a duration such as 90s, 10m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if not match:
            raise StudyError(f"{field}: expected a duration such as 90s, 10m or 1h, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise StudyError(f"{field}: must be positive, got {value!r}")
    return seconds


def _check_value(flag: Flag, value: Any, field: str) -> Any:
    """A value of the flag's type (ints given for float flags become floats)."""
    if value is None:
        return None
    if flag.kind == "bool":
        ok = isinstance(value, bool)
    elif flag.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif flag.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        want = {"bool": "true or false", "int": "an integer", "float": "a number",
                "str": "a string"}[flag.kind]
        raise StudyError(f"{field}: expected {want}, got {value!r}")
    if flag.choices is not None and value not in flag.choices:
        raise StudyError(f"{field}: expected one of {', '.join(map(str, flag.choices))}, got {value!r}")
    return value


def _lookup(flags: Mapping[str, Flag], name: Any, field: str, command: str) -> Flag:
    if not isinstance(name, str) or str(name).startswith("-"):
        raise StudyError(f"{field}: {name!r}: write flag names without dashes, e.g. chunk-size")
    flag = flags.get(name.replace("_", "-"))
    if flag is None:
        raise StudyError(f"{field}: {name!r} is not a `kvloom {command}` flag (`kvloom {command} --help` "
                         "lists them)")
    return flag


def _mapping(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{field}: expected a mapping, got {type(value).__name__}")
    return value


def _parse_flag_values(raw: Any, field: str, flags: Mapping[str, Flag], command: str,
                       reserved: tuple[str, ...]) -> dict:
    out = {}
    for name, value in _mapping(raw, field).items():
        flag = _lookup(flags, name, f"{field}.{name}", command)
        if flag.name in reserved:
            raise StudyError(f"{field}.{name}: set by the tuner itself")
        if isinstance(value, list) and flag.kind in ("int", "float", "str") and command == "bench":
            value = ",".join(str(v) for v in value)  # --sweep-concurrency 1,4,8
        out[flag.name] = _check_value(flag, value, f"{field}.{name}")
    return out


def _parse_knob(name: Any, raw: Any, flags: Mapping[str, Flag]) -> Knob:
    field = f"knobs.{name}"
    flag = _lookup(flags, name, field, "serve")
    if flag.name in TUNER_SERVE_FLAGS:
        raise StudyError(f"{field}: set by the tuner itself")
    if isinstance(raw, list):
        if not raw:
            raise StudyError(f"{field}: needs at least one choice")
        choices = tuple(_check_value(flag, v, f"{field}[{i}]") for i, v in enumerate(raw))
        if len(set(choices)) != len(choices):
            raise StudyError(f"{field}: a choice is given twice")
        return Knob(flag.name, flag.kind, choices=choices)
    if isinstance(raw, dict) and "choices" in raw:
        choices = raw["choices"]
        return _parse_knob(name, choices if isinstance(choices, list) else [choices], flags)
    if not isinstance(raw, dict):
        raise StudyError(f"{field}: expected a list of choices or {{low, high[, step][, log]}}")
    if flag.kind not in ("int", "float"):
        raise StudyError(f"{field}: a range needs a numeric flag; give --{flag.name} a list of choices")
    unknown = set(raw) - {"low", "high", "step", "log"}
    if unknown:
        raise StudyError(f"{field}.{sorted(unknown)[0]}: unknown key (expected low, high, step, log)")
    for key in ("low", "high"):
        if key not in raw:
            raise StudyError(f"{field}.{key}: required for a range")
    low = _check_value(flag, raw["low"], f"{field}.low")
    high = _check_value(flag, raw["high"], f"{field}.high")
    step = _check_value(flag, raw["step"], f"{field}.step") if raw.get("step") is not None else None
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise StudyError(f"{field}.log: expected true or false, got {log!r}")
    if low > high:
        raise StudyError(f"{field}.high: {high} is below low {low}")
    if step is not None and step <= 0:
        raise StudyError(f"{field}.step: must be positive, got {step}")
    if log and (low <= 0 or step not in (None, 1)):
        raise StudyError(f"{field}.log: needs low > 0 and no step")
    return Knob(flag.name, flag.kind, low=low, high=high, step=step, log=log)


def _parse_slos(raw: Any) -> tuple[TunedSLO, ...]:
    slos = []
    for name, value in _mapping(raw, "slos").items():
        field = f"slos.{name}"
        hard = True
        if isinstance(value, dict):
            unknown = set(value) - {"max", "hard"}
            if unknown:
                raise StudyError(f"{field}.{sorted(unknown)[0]}: unknown key (expected max, hard)")
            if "max" not in value:
                raise StudyError(f"{field}.max: required, e.g. {{max: 500ms}}")
            hard = value.get("hard", True)
            if not isinstance(hard, bool):
                raise StudyError(f"{field}.hard: expected true or false, got {hard!r}")
            value = value["max"]
        try:
            (slo,) = parse_slos(f"{name}={value}")
        except ValueError as exc:
            raise StudyError(f"{field}: {exc}") from None
        slos.append(TunedSLO(slo, hard))
    return tuple(slos)


def _parse_objectives(raw: Any) -> tuple[Objective, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if raw is None or not items or len(items) > 2:
        raise StudyError("objectives: give one or two, e.g. [maximize output_throughput]")
    objectives = []
    for i, item in enumerate(items):
        field = f"objectives[{i}]"
        parts = str(item).split() if isinstance(item, str) else []
        if len(parts) != 2 or parts[0] not in ("maximize", "minimize"):
            raise StudyError(f"{field}: expected 'maximize FIGURE' or 'minimize FIGURE', got {item!r}")
        if parts[1] not in FIGURES:
            raise StudyError(f"{field}: unknown figure {parts[1]!r}; figures: {', '.join(FIGURES)}")
        objectives.append(Objective(parts[1], parts[0]))
    if len({o.figure for o in objectives}) != len(objectives):
        raise StudyError("objectives: the same figure twice")
    return tuple(objectives)


def _int_field(section: dict, key: str, field: str, default: Any, low: int) -> Any:
    value = section.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise StudyError(f"{field}: expected an integer >= {low}, got {value!r}")
    return value


def _check_workload(workload: dict) -> None:
    """Let `kvloom bench` validate the workload as it would on its own command line."""
    from kvloom.tools.bench import plan_from_args

    try:
        args = bench_parser().parse_args(flags_to_argv(workload))
        plan_from_args(args)
    except UsageError as exc:
        raise StudyError(f"workload: {exc}") from None


def parse_study(data: Any, default_name: str = "study") -> StudySpec:
    if not isinstance(data, dict):
        raise StudyError("study: expected a mapping at the top of the file")
    known = {"name", "model", "serve", "knobs", "workload", "slos", "objectives", "objective", "strategy",
             "budget", "timeouts"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StudyError(f"{unknown[0]}: unknown field (expected one of {', '.join(sorted(known))})")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise StudyError(f"name: expected a non-empty string, got {name!r}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise StudyError(f"model: expected a path or null, got {model!r}")

    flags = serve_flags()
    serve = _parse_flag_values(data.get("serve"), "serve", flags, "serve", TUNER_SERVE_FLAGS)
    knobs_raw = _mapping(data.get("knobs"), "knobs")
    if not knobs_raw:
        raise StudyError("knobs: give at least one kvloom serve flag to tune")
    knobs = tuple(_parse_knob(n, v, flags) for n, v in knobs_raw.items())
    for knob in knobs:
        if knob.name in serve:
            raise StudyError(f"knobs.{knob.name}: also fixed under serve")

    workload = _parse_flag_values(data.get("workload"), "workload", parser_flags(bench_parser()), "bench",
                                  TUNER_BENCH_FLAGS)
    _check_workload(workload)
    slos = _parse_slos(data.get("slos"))
    if "objective" in data and "objectives" in data:
        raise StudyError("objective: give objective or objectives, not both")
    objectives = _parse_objectives(data.get("objectives", data.get("objective")))

    raw_strategy = data.get("strategy", "bayesian")
    strategy_map = raw_strategy if isinstance(raw_strategy, dict) else {"name": raw_strategy}
    unknown = set(strategy_map) - {"name", "seed"}
    if unknown:
        raise StudyError(f"strategy.{sorted(unknown)[0]}: unknown key (expected name, seed)")
    strategy = strategy_map.get("name")
    if strategy not in STRATEGIES:
        raise StudyError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    seed = _int_field(strategy_map, "seed", "strategy.seed", 0, 0)

    budget = _mapping(data.get("budget"), "budget")
    unknown = set(budget) - {"trials", "wall_time"}
    if unknown:
        raise StudyError(f"budget.{sorted(unknown)[0]}: unknown key (expected trials, wall_time)")
    num_trials = _int_field(budget, "trials", "budget.trials", None, 1)
    wall_time = budget.get("wall_time")
    wall_time_s = None if wall_time is None else parse_duration(wall_time, "budget.wall_time")

    timeouts = _mapping(data.get("timeouts"), "timeouts")
    unknown = set(timeouts) - {"warmup", "bench", "stop"}
    if unknown:
        raise StudyError(f"timeouts.{sorted(unknown)[0]}: unknown key (expected warmup, bench, stop)")
    spec = StudySpec(
        name=name.strip(), model=model, serve=serve, knobs=knobs, workload=workload, slos=slos,
        objectives=objectives, strategy=strategy, seed=seed, num_trials=0, wall_time_s=wall_time_s,
        warmup_timeout_s=parse_duration(timeouts.get("warmup", 600), "timeouts.warmup"),
        bench_timeout_s=parse_duration(timeouts.get("bench", 600), "timeouts.bench"),
        stop_timeout_s=parse_duration(timeouts.get("stop", 30), "timeouts.stop"),
    )
    grid_size = None
    if strategy == "grid":
        grid_size = 1
        for values in spec.grid_space().values():
            grid_size *= len(values)
    if num_trials is None:
        if grid_size is None:
            raise StudyError("budget.trials: required for the random and bayesian strategies")
        num_trials = grid_size
    elif grid_size is not None and num_trials > grid_size:
        raise StudyError(f"budget.trials: {num_trials} is more than the {grid_size} points of the grid")
    return StudySpec(**{**spec.__dict__, "num_trials": num_trials})


def load_study(path: str) -> StudySpec:
    try:
        data = read_yaml(path)
    except FlagFileError as exc:
        raise StudyError(f"study: {exc}") from None
    return parse_study(data, default_name=os.path.splitext(os.path.basename(path))[0])

