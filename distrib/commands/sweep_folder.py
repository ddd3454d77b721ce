"""A sweep's folder: what was asked (`sweep.json`, a copy of the sweep file), and the config
files it writes (each trial's, and the best one), which `distrib train --config` takes as they are.

    <sweep dir>/sweep.json            the training config, the overrides, the working folder
    <sweep dir>/space.toml            the sweep file, as it was when the sweep started
    <sweep dir>/study.journal         the Optuna study (unless [sweep] storage names a database)
    <sweep dir>/trials/trial-NNNN/    each trial's run folder, with its config.toml, train.log,
                                      sweep.json (its outcome) and heartbeat.json
    <sweep dir>/best.toml             the best trial's config, training into <sweep dir>/best
    <sweep dir>/report/               `distrib sweep report`
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from distrib.commands.sweep_space import SweepSpace, load_space
from distrib.config import get_value, load_config, parse_overrides
from distrib.errors import UserError

SETUP = "sweep.json"
SPACE = "space.toml"


@dataclass
class SweepSetup:
    """Everything a worker needs to run trials, on this machine or a Slurm node."""

    sweep_dir: Path
    config: Path | None  # the training config (absolute), None for the built-in defaults
    overrides: list[str]  # --section.key=value for every trial
    cwd: Path  # where relative paths in the config (data.dir) are resolved: where it started
    space: SweepSpace

    def save(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.space.path, self.sweep_dir / SPACE)
        doc = {
            "config": str(self.config) if self.config else None,
            "overrides": self.overrides,
            "cwd": str(self.cwd),
        }
        (self.sweep_dir / SETUP).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def new_setup(
    sweep_dir: Path, config: Path | None, overrides: list[str], space: SweepSpace
) -> SweepSetup:
    return SweepSetup(
        sweep_dir.resolve(),
        config.resolve() if config else None,
        overrides,
        Path.cwd(),
        space,
    )


def load_setup(sweep_dir: Path) -> SweepSetup:
    """The setup a sweep was started with (for workers, `--resume` and the report)."""
    path = sweep_dir / SETUP
    if not path.is_file():
        raise UserError(
            f"{sweep_dir} is not a sweep folder (no {SETUP}); start one with distrib sweep --config C --space S"
        )
    doc = json.loads(path.read_text(encoding="utf-8"))
    config = Path(doc["config"]) if doc["config"] else None
    space = load_space(sweep_dir / SPACE)
    return SweepSetup(sweep_dir.resolve(), config, list(doc["overrides"]), Path(doc["cwd"]), space)


def _nest(data: dict[str, Any], key: str, value: Any) -> None:
    if key.startswith("data.sources.") and key.count(".") >= 3:  # a mixture source's field
        name, _, field = key.removeprefix("data.sources.").rpartition(".")
        entry = next(e for e in data["data"]["sources"] if e.get("name") == name)
        entry[field] = value
        return
    section, _, name = key.partition(".")
    data.setdefault(section, {})[name] = value


class ConfigSource(Protocol):
    """A training config file (None: the defaults) and the overrides applied to it."""

    config: Path | None
    overrides: list[str]


def write_config(
    path: Path, setup: ConfigSource, params: dict[str, Any], run_dir: Path, description: str
) -> Path:
    """A complete TOML config: the sweep's training config with its overrides and `params`,
    training into `run_dir`. Values are written with their config types (1e-3, not "1e-3").
    Relative paths stay relative to `setup.cwd`, where the trials run."""
    flags = [*setup.overrides, *(f"--{k}={v}" for k, v in params.items())]
    typed = load_config(setup.config, flags)  # checks the combination, too
    data: dict[str, Any] = {}
    if setup.config is not None:
        data = tomllib.loads(setup.config.read_text(encoding="utf-8"))
    for key in [k for k, _ in parse_overrides(setup.overrides)] + list(params):
        _nest(data, key, get_value(typed, key))
    for key, value in (("job.run_dir", str(run_dir)), ("job.description", description)):
        _nest(data, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path
