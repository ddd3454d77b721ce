"""Loading a run configuration: dataclass defaults < TOML file < `--section.key=value`.

Anything wrong (unknown key, wrong type, a value outside a field's `Literal` choices, an
impossible combination) raises `ConfigError` naming the key and what would be valid, before any
work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrib.config.sections import SECTIONS, Config, ModelConfig, base_type, choices
from distrib.config.validate import validate
from distrib.errors import ConfigError


def _nearest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid: {', '.join(options)}"


def _coerce(key: str, value: Any, kind: type, from_text: bool) -> Any:
    """Convert a TOML value (or a command-line string) to the field's type, or explain why not."""
    if from_text and kind is list:
        raise ConfigError(f"{key} has no command-line form: set it in the TOML file")
    if from_text and isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            if kind is int:
                return int(value)
            if kind is float:
                return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got '{value}'") from None
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Keys whose natural name is a Python keyword.
_ALIASES = {"checkpoint.async": "checkpoint.async_save"}


def _set_source(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    """`data.sources.<name>.<field>`: one field of a mixture's source, named by the source's
    name (so that a command line or a sweep can change a weight)."""
    _, _, rest = key.partition("data.sources.")
    name, _, field = rest.rpartition(".")
    entries = [e for e in cfg.data.sources if isinstance(e, dict) and e.get("name") == name]
    if not entries:
        names = [str(e.get("name")) for e in cfg.data.sources if isinstance(e, dict)]
        raise ConfigError(
            f"{key}: no source named '{name}' in data.sources (valid: {', '.join(names) or 'none'})"
        )
    kinds = {"weight": float, "max_epochs": float, "source": str, "text_field": str}
    if field not in kinds:
        raise ConfigError(f"unknown key '{key}': {_nearest(field, list(kinds))}")
    entries[0][field] = _coerce(key, value, kinds[field], from_text)


def _set(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    key = _ALIASES.get(key, key)
    if key.startswith("data.sources.") and key.count(".") >= 3:
        _set_source(cfg, key, value, from_text)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown section '{section}' in '{key}': {_nearest(section, list(SECTIONS))}"
        )
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if not name or name not in names:
        options = [f"{section}.{n}" for n in names]
        raise ConfigError(f"unknown key '{key}': {_nearest(key, options)}")
    obj = getattr(cfg, section)
    setattr(obj, name, _coerce(key, value, base_type(section, name), from_text))


def get_value(cfg: Config, key: str) -> Any:
    """The value of `section.key` in `cfg` (the names the TOML file and the command line use),
    or of a mixture source's field, `data.sources.<name>.<field>`."""
    if key.startswith("data.sources.") and key.count(".") >= 3:
        name, _, field = key.removeprefix("data.sources.").rpartition(".")
        return next(e[field] for e in cfg.data.sources if e.get("name") == name)
    section, _, name = _ALIASES.get(key, key).partition(".")
    return getattr(getattr(cfg, section), name)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--a.b=v` or `--a.b v` pairs from a command line; anything else is an error."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides look like --section.key=value"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


# Fills model keys from outside config/ (which may not import models/): given the model section
# and the names of the model keys the user set, returns the section to validate. The CLI passes
# `distrib.models.hf.init_from_model_config`, so `model.init_from = "hf:PATH"` sets the shape.
ModelResolver = Callable[[ModelConfig, set[str]], ModelConfig]


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    resolve_model: ModelResolver | None = None,
) -> Config:
    """Defaults, then the TOML file at `path`, then command-line overrides, then
    `resolve_model` (if given) on the model section; validated."""
    cfg = Config()
    explicit: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{path}: '{section}' must be a [section] table: {_nearest(section, list(SECTIONS))}"
                )
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value, from_text=False)
                explicit.add(f"{section}.{name}")
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value, from_text=True)
        explicit.add(key)
    _check_choices(cfg)
    if resolve_model is not None:
        names = {key.partition(".")[2] for key in explicit if key.startswith("model.")}
        cfg.model = resolve_model(cfg.model, names)
    validate(cfg)
    return cfg


def _check_choices(cfg: Config) -> None:
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            options = choices(section, f.name)
            value = getattr(obj, f.name)
            if options and value not in options:
                raise ConfigError(
                    f"{section}.{f.name} = '{value}' is not valid: "
                    f"{_nearest(str(value), [str(o) for o in options])}"
                )


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (for config.json in the run folder and checkpoint manifests)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`, validated the same way as a TOML file."""
    cfg = Config()
    for section, values in data.items():
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, from_text=False)
    _check_choices(cfg)
    validate(cfg)
    return cfg


def help_lines() -> list[str]:
    """One line per key with its type, default and help, for `distrib train --help`."""
    lines = []
    defaults = Config()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(defaults, section)):
            kind = base_type(section, f.name).__name__
            default = getattr(getattr(defaults, section), f.name)
            options = choices(section, f.name)
            extra = f" ({'|'.join(str(o) for o in options)})" if options else ""
            lines.append(
                f"  --{section}.{f.name} {kind} = {default!r}: {f.metadata['help']}{extra}"
            )
    return lines
