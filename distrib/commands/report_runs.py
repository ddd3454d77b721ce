"""Reading run folders for `distrib report`: `config.json` and `metrics.jsonl` only, so it works on
runs from any machine, finished, crashed or still going. Keys that older runs lack, or logged as
null, leave their series out rather than fail. A fault-tolerant run folder
(`parallel.fault_tolerance`) holds one run folder per replica group, `group0`, `group1`, ...:
each is read as a run of its own, named `<run>/group<g>`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.errors import UserError


@dataclass
class Run:
    """One run folder: its config and its records, one per logged step."""

    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]  # sorted by step; a repeated step keeps its last occurrence
    first_window_steps: frozenset[int] = frozenset()  # logged first after a (re)start
    wall_time_s: float | None = None  # elapsed_s summed over (re)starts, in file order
    replica_of: str | None = None  # a replica group's: the name of its fault-tolerant run folder


_GROUP = re.compile(r"group(\d+)")


def group_dirs(run_dir: Path) -> list[Path]:
    """The replica-group run folders (`group<g>` with a metrics.jsonl) of a fault-tolerant run
    folder, by group index; empty for any other folder."""
    found = []
    for child in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        match = _GROUP.fullmatch(child.name)
        if match and (child / "metrics.jsonl").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def load_runs(run_dir: Path) -> list[Run]:
    """The runs of a run folder: itself, or, for a fault-tolerant run folder without a
    metrics.jsonl of its own, one run per replica group (`<run>/group<g>`)."""
    run_dir = Path(run_dir)
    groups = [] if (run_dir / "metrics.jsonl").is_file() else group_dirs(run_dir)
    if not groups:
        return [load_run(run_dir)]
    name = run_dir.resolve().name
    return [
        dataclasses.replace(load_run(g), name=f"{name}/{g.name}", replica_of=name) for g in groups
    ]


def load_run(run_dir: Path) -> Run:
    """Read `<run_dir>/metrics.jsonl` and `config.json` (optional) into a `Run`.

    A repeated step keeps its last occurrence; `tokens`, when a record lacks it, is derived as
    step x training.global_batch_size x data.seq_len.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; is {run_dir} a run folder (job.run_dir)?")
    raw = _read_jsonl(path)
    config = _read_config(run_dir / "config.json")
    starts = _restarts(raw)
    by_step = {rec["step"]: (rec, start) for rec, start in zip(raw, starts, strict=True)}
    return Run(
        name=run_dir.resolve().name,
        config=config,
        records=[_with_tokens(by_step[s][0], config) for s in sorted(by_step)],
        first_window_steps=frozenset(s for s, (_, start) in by_step.items() if start),
        wall_time_s=_wall_time(raw, starts),
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        elif i < len(lines):  # a crash mid-write may cut the last line short; tolerate only that
            raise UserError(f"{path}:{i}: not a metrics record (a JSON object with an int step)")
    return records


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err
    return config if isinstance(config, dict) else {}


def _restarts(raw: list[dict[str, Any]]) -> list[bool]:
    """For each record in file order: does it open a new (re)start of the run?"""
    flags, prev_step, prev_elapsed = [], None, None
    for rec in raw:
        elapsed = num(rec, "elapsed_s")
        start = (
            prev_step is None
            or rec["step"] <= prev_step
            or (elapsed is not None and prev_elapsed is not None and elapsed < prev_elapsed)
        )
        if start:
            prev_elapsed = None
        flags.append(start)
        prev_step = rec["step"]
        prev_elapsed = elapsed if elapsed is not None else prev_elapsed
    return flags


def _wall_time(raw: list[dict[str, Any]], starts: list[bool]) -> float | None:
    """The last elapsed_s of each (re)start, summed; None if no record has one."""
    total, last, seen = 0.0, 0.0, False
    for rec, start in zip(raw, starts, strict=True):
        if start:
            total, last = total + last, 0.0
        elapsed = num(rec, "elapsed_s")
        if elapsed is not None:
            last, seen = elapsed, True
    return total + last if seen else None


def _with_tokens(rec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    if num(rec, "tokens") is not None:
        return rec
    batch = config.get("training", {}).get("global_batch_size")
    seq_len = config.get("data", {}).get("seq_len")
    if not (isinstance(batch, int) and isinstance(seq_len, int)):
        return rec
    return {**rec, "tokens": rec["step"] * batch * seq_len}


def num(rec: dict[str, Any], key: str) -> float | None:
    """`rec[key]` as a finite float; None when missing, null, non-numeric or not finite."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(records: Iterable[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of the records that have both keys."""
    points = [(num(r, x), num(r, y)) for r in records]
    kept = [(a, b) for a, b in points if a is not None and b is not None]
    return [a for a, _ in kept], [b for _, b in kept]
