"""The sweep file: which config keys to search over, how, and where the trials run.

    [sweep]                          # the search (every key optional but `trials`)
    trials = 8                       # the budget: trials started, whatever their outcome
    workers = 2                      # trials at once (local processes, or Slurm array tasks)
    nproc = 1                        # processes per trial (torchrun when more than one)
    sampler = "tpe"                  # grid | random | tpe | cmaes
    pruner = "successive_halving"    # none | median | successive_halving | hyperband
    metric = "val_loss"              # any number a run logs to metrics.jsonl
    goal = "final"                   # final | best: the trial's value is its last or best one
    direction = "minimize"
    launcher = "local"               # local | slurm
    [overrides]                      # config values every trial gets (before the command line's)
    "training.steps" = 200
    [pruner]                         # the pruner's own options (Optuna's names)
    min_resource = 10
    [slurm]                          # the batch options of each worker job
    partition = "gpu"
    [params]                         # config keys (quoted, or as nested tables)
    "training.lr" = { type = "log_uniform", low = 1e-4, high = 1e-2 }
    "training.warmup_steps" = { type = "int", low = 0, high = 40, step = 10 }
    "training.schedule" = { type = "categorical", choices = ["cosine", "wsd"] }

Everything is checked when the file is read, and each parameter's extremes are applied to the
training config, so a key that does not exist or a value it refuses stops `distrib sweep` before
any trial starts, with the file and the key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrib.errors import ConfigError

SAMPLERS = ("grid", "random", "tpe", "cmaes")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
GOALS = ("final", "best")
DIRECTIONS = ("minimize", "maximize")
LAUNCHERS = ("local", "slurm")
PARAM_TYPES = ("log_uniform", "uniform", "int", "categorical")
# Each pruner's options, as Optuna names them, with the type each must have.
PRUNER_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "none": {},
    "median": {"n_startup_trials": int, "n_warmup_steps": int, "interval_steps": int},
    "successive_halving": {
        "min_resource": (int, str),
        "reduction_factor": int,
        "min_early_stopping_rate": int,
    },
    "hyperband": {"min_resource": int, "max_resource": (int, str), "reduction_factor": int},
}
SLURM_KEYS: dict[str, type] = {
    "partition": str,
    "account": str,
    "time": str,
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem": str,
    "extra": list,
}


@dataclass
class Param:
    """One searched config key."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)

    def grid(self) -> list[Any]:
        """The values the grid sampler visits."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None and self.step is not None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else values

    def extremes(self) -> list[Any]:
        """The values that bound the range: what the config check tries."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclass
class SweepSpace:
    """A parsed sweep file."""

    path: Path
    params: list[Param]
    trials: int
    workers: int = 1
    nproc: int = 1
    sampler: str = "tpe"
    pruner: str = "none"
    metric: str = "val_loss"
    goal: str = "final"
    direction: str = "minimize"
    launcher: str = "local"
    seed: int = 0
    dir: str = ""
    storage: str = ""
    pruner_options: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # --section.key=value, from [overrides]

    def grid_size(self) -> int:
        return math.prod(len(p.grid()) for p in self.params)


def _nearest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid: {', '.join(options)}"


def _number(where: str, value: Any, kind: type) -> Any:
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """`[params]` as {dotted key: spec}: a spec is a table with `type`; any other table nests."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if not isinstance(value, dict):
            raise ConfigError(
                f"params.'{key}': expected a table such as "
                '{ type = "log_uniform", low = 1e-4, high = 1e-2 }, '
                f"got {value!r}"
            )
        out.update({key: value} if "type" in value else _flatten(value, f"{key}."))
    return out


def _flag(key: str, value: Any) -> str:
    if isinstance(value, dict | list):
        raise ConfigError(f"overrides.'{key}': expected a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"--{key}={text}"


def _overrides(table: dict[str, Any], prefix: str = "") -> list[str]:
    """`[overrides]` as command-line flags; nested tables are dotted keys."""
    out: list[str] = []
    for name, value in table.items():
        key = f"{prefix}{name}"
        out += _overrides(value, f"{key}.") if isinstance(value, dict) else [_flag(key, value)]
    return out


def _param(where: str, key: str, spec: dict[str, Any]) -> Param:
    kind = spec["type"]
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{where}.type = '{kind}' is not valid: {_nearest(str(kind), PARAM_TYPES)}"
        )
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step"}
    for name in spec:
        if name not in allowed:
            raise ConfigError(
                f"{where}: unknown field '{name}' for {kind}: {_nearest(name, sorted(allowed))}"
            )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list `choices`")
        return Param(key, kind, choices=choices)
    number = int if kind == "int" else float
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: {kind} needs `low` and `high`")
    low, high = (_number(f"{where}.{n}", spec[n], number) for n in ("low", "high"))
    step = _number(f"{where}.step", spec["step"], number) if "step" in spec else None
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0, got {low}")
    if step is not None and (step <= 0 or kind == "log_uniform"):
        raise ConfigError(f"{where}.step: a positive step, and none for log_uniform")
    if kind == "int" and step is None:
        step = 1
    return Param(key, kind, low, high, step)


def _section(path: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{name}' must be a [{name}] table")
    return value


def _typed(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    return value


def _settings(path: Path, sweep: dict[str, Any]) -> dict[str, Any]:
    """The [sweep] table, each key checked against `SweepSpace`'s fields."""
    fields = {f.name: f for f in dataclasses.fields(SweepSpace)}
    own = [n for n in fields if n not in ("path", "params", "pruner_options", "slurm", "overrides")]
    choices = {
        "sampler": SAMPLERS,
        "pruner": PRUNERS,
        "goal": GOALS,
        "direction": DIRECTIONS,
        "launcher": LAUNCHERS,
    }
    out: dict[str, Any] = {}
    for name, value in sweep.items():
        where = f"{path}: sweep.{name}"
        if name not in own:
            raise ConfigError(f"{path}: unknown key 'sweep.{name}': {_nearest(name, own)}")
        kind = int if name in ("trials", "workers", "nproc", "seed") else str
        out[name] = _typed(where, value, kind)
        if name in choices and value not in choices[name]:
            raise ConfigError(f"{where} = '{value}' is not valid: {_nearest(value, choices[name])}")
        if name in ("trials", "workers", "nproc") and value < 1:
            raise ConfigError(f"{where} = {value}: must be at least 1")
    if "trials" not in out:
        raise ConfigError(f"{path}: sweep.trials (the number of trials) is required")
    return out


def load_space(path: str | Path) -> SweepSpace:
    """Read and check a sweep file (not yet against the training config: see `check_keys`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    tables = ("sweep", "params", "overrides", "pruner", "slurm")
    for name in data:
        if name not in tables:
            raise ConfigError(f"{path}: unknown table [{name}]: {_nearest(name, tables)}")
    space = SweepSpace(path=path, params=[], **_settings(path, _section(path, data, "sweep")))
    specs = _flatten(_section(path, data, "params"))
    if not specs:
        raise ConfigError(f"{path}: [params] names no config key to search over")
    space.params = [_param(f"{path}: params.'{k}'", k, s) for k, s in specs.items()]
    space.overrides = _overrides(_section(path, data, "overrides"))
    options = PRUNER_OPTIONS[space.pruner]
    for name, value in _section(path, data, "pruner").items():
        if name not in options:
            valid = ", ".join(options) or "none"
            raise ConfigError(
                f"{path}: pruner.{name} is not an option of {space.pruner}: valid: {valid}"
            )
        space.pruner_options[name] = _typed(f"{path}: pruner.{name}", value, options[name])
    for name, value in _section(path, data, "slurm").items():
        if name not in SLURM_KEYS:
            raise ConfigError(
                f"{path}: unknown key 'slurm.{name}': {_nearest(name, list(SLURM_KEYS))}"
            )
        space.slurm[name] = _typed(f"{path}: slurm.{name}", value, SLURM_KEYS[name])
    if space.sampler == "grid":
        for p in space.params:
            if p.type != "categorical" and p.step is None:
                raise ConfigError(
                    f"{path}: params.'{p.key}': the grid sampler needs a `step` for {p.type} "
                    "(or make it categorical with its values)"
                )
    return space


def check_keys(space: SweepSpace, config: Path | None, overrides: list[str]) -> None:
    """Apply each parameter's extremes to the training config: an unknown key, a wrong type
    or a value the config refuses is reported with the sweep file and the key."""
    from distrib.config import load_config

    for param in space.params:
        for value in param.extremes():
            try:
                load_config(config, [*overrides, f"--{param.key}={value}"])
            except ConfigError as err:
                raise ConfigError(
                    f"{space.path}: params.'{param.key}' = {value!r}: {err}"
                ) from None
