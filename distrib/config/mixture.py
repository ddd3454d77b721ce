"""A data mixture's sources and weight schedule, as the TOML file writes them:

    [[data.sources]]
    name = "code"            # names the source's folder, metrics (val_loss/code) and weights
    source = ""              # anything data.source takes
    weight = 0.8             # relative; normalised over the sources
    text_field = "text"      # optional, as data.text_field
    max_epochs = 0.0         # optional cap on passes over the source (0: none)

    [[data.weight_schedule]]  # optional: new weights from a step on (an annealing mix)
    step = 150
    weights = { code = 0.5, docs = 0.5 }

Parsed here, once, for validation and for the data code alike; pure Python (no torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from distrib.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SOURCE_KEYS = {"name": str, "source": str, "weight": float, "text_field": str, "max_epochs": float}


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture."""

    name: str
    source: str
    weight: float
    text_field: str = "text"
    max_epochs: float = 0.0


@dataclass(frozen=True)
class WeightChange:
    """From optimizer step `step` on (that step's batch included), these weights."""

    step: int
    weights: dict[str, float]


def _typed(where: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def parse_sources(raw: list[Any]) -> list[MixtureSource]:
    """`data.sources` as typed entries; ConfigError naming the entry and key otherwise."""
    out: list[MixtureSource] = []
    for i, entry in enumerate(raw):
        where = f"data.sources[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a [[data.sources]] table, got {entry!r}")
        for key in entry:
            if key not in _SOURCE_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}': valid: {', '.join(_SOURCE_KEYS)}")
        if "name" not in entry or "weight" not in entry:
            raise ConfigError(f"{where}: needs a name and a weight")
        values = {k: _typed(f"{where}.{k}", v, _SOURCE_KEYS[k]) for k, v in entry.items()}
        values.setdefault("source", "")
        source = MixtureSource(**values)
        if not _NAME.match(source.name):
            raise ConfigError(
                f"{where}.name = '{source.name}': letters, digits, '_' and '-', starting with a "
                "letter (it names a folder and a metric)"
            )
        if not (math.isfinite(source.weight) and source.weight >= 0):
            raise ConfigError(f"{where}.weight = {source.weight}: must be >= 0")
        if source.max_epochs < 0:
            raise ConfigError(f"{where}.max_epochs = {source.max_epochs}: must be >= 0 (0: none)")
        out.append(source)
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"data.sources: the name '{name}' is used twice")
    if out and sum(s.weight for s in out) <= 0:
        raise ConfigError("data.sources: the weights sum to 0; give at least one source weight")
    return out


def parse_schedule(raw: list[Any], names: list[str]) -> list[WeightChange]:
    """`data.weight_schedule` as typed changes, in increasing step order."""
    out: list[WeightChange] = []
    for i, entry in enumerate(raw):
        where = f"data.weight_schedule[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"step", "weights"}:
            raise ConfigError(f"{where}: expected {{ step = N, weights = {{ NAME = W, ... }} }}")
        step = _typed(f"{where}.step", entry["step"], int)
        weights = entry["weights"]
        if not isinstance(weights, dict):
            raise ConfigError(f"{where}.weights: expected a table of source name = weight")
        for name, w in weights.items():
            if name not in names:
                raise ConfigError(
                    f"{where}.weights: no source named '{name}': valid: {', '.join(names)}"
                )
            if not (math.isfinite(_typed(f"{where}.weights.{name}", w, float)) and w >= 0):
                raise ConfigError(f"{where}.weights.{name} = {w}: must be >= 0")
        full = {n: float(weights.get(n, 0.0)) for n in names}
        if sum(full.values()) <= 0:
            raise ConfigError(f"{where}.weights sum to 0")
        if step < 1 or (out and step <= out[-1].step):
            raise ConfigError(f"{where}.step = {step}: steps must be >= 1 and increasing")
        out.append(WeightChange(step, full))
    return out


def weights_at(
    sources: list[MixtureSource], schedule: list[WeightChange], step: int
) -> dict[str, float]:
    """The configured weights of optimizer step `step` (1-based), before any normalisation."""
    weights = {s.name: s.weight for s in sources}
    for change in schedule:
        if change.step <= step:
            weights = dict(change.weights)
    return weights
