"""`distrib report`: charts and a summary table from the run folders of one or more runs.

Runs are read by `report_runs.py` and drawn by `report_charts.py`; `report_moe.py` adds the
Mixture-of-Experts section where runs logged it, `report_sync.py` the synchronization between
fault-tolerant replica groups (loss vs step and vs bytes communicated) where runs logged
`sync_bytes`; this module writes the summary table and the report folder. A fault-tolerant run
folder counts as one run per replica group (`<run>/group<g>`) in the table and the per-run
charts, and as one line (the groups' mean loss) in the synchronization chart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distrib.commands.report_charts import CHARTS, line_chart, step_time_chart
from distrib.commands.report_mixture import has_mixture, mixture_charts, mixture_markdown
from distrib.commands.report_moe import CHART as MOE_CHART
from distrib.commands.report_moe import has_moe, moe_markdown, with_moe_max
from distrib.commands.report_runs import Run, load_run, load_runs, num, series
from distrib.commands.report_sync import FILE as SYNC_FILE
from distrib.commands.report_sync import has_sync, sync_chart, sync_curves, sync_markdown
from distrib.errors import UserError

__all__ = ["load_run", "load_runs", "series", "summarize", "write_report"]

AXES = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
STEADY_NOTE = (
    "Mean tokens/s and mean MFU: the mean over logged windows, excluding the first window "
    "after each (re)start, which includes warm-up (first allocations, data loader start, "
    "compilation). MFU is n/a where the device's peak is unknown (CPUs; set "
    "`metrics.peak_tflops`)."
)
NOTES = (
    STEADY_NOTE,
    "Wall time: the last `elapsed_s`, summed over restarts (a restart is detected where "
    "`elapsed_s` decreases or the step does not advance).",
    "A step logged more than once (a run restarted with `checkpoint.resume=never`) counts "
    "its last occurrence.",
)


def summarize(run: Run) -> dict[str, Any]:
    """The numbers of the run's summary row (None where the run has no data for one)."""
    recs = run.records
    _, losses = series(recs, "step", "loss")
    val_steps, vals = series(recs, "step", "val_loss")
    best = min(range(len(vals)), key=vals.__getitem__) if vals else None
    # The first window of each (re)start includes warm-up; the first record always is one.
    steady = [r for i, r in enumerate(recs) if i > 0 and r["step"] not in run.first_window_steps]
    return {
        "run": run.name,
        "steps": recs[-1]["step"] if recs else 0,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": vals[best] if best is not None else None,
        "best_val_step": int(val_steps[best]) if best is not None else None,
        "tokens_per_s": _mean(num(r, "tokens_per_s") for r in steady),
        "mfu": _mean(num(r, "mfu") for r in steady),
        "wall_time_s": run.wall_time_s,
        "layout": _layout(run),
        "dtype": run.config.get("training", {}).get("dtype"),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _layout(run: Run) -> str | None:
    """dp_replicate x dp_shard x cp x tp x pp; a -1 degree is inferred from the logged device
    count. Runs from before context parallelism have no cp: it was 1."""
    parallel = {"cp": 1, **run.config.get("parallel", {})}
    degrees: list[int | str] = [parallel.get(axis) for axis in AXES]
    if not all(isinstance(d, int) for d in degrees):
        return None
    if -1 in degrees:
        known = math.prod(d for d in degrees if isinstance(d, int) and d > 0)
        world = _world_size(run.records)
        inferred = str(world // known) if world and world % known == 0 else "?"
        degrees = [inferred if d == -1 else d for d in degrees]
    return " x ".join(str(d) for d in degrees)


def _world_size(records: list[dict[str, Any]]) -> int | None:
    for rec in reversed(records):
        total, per_device = num(rec, "tokens_per_s"), num(rec, "tokens_per_s_per_device")
        if total and per_device:
            return round(total / per_device)
    return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_row(s: dict[str, Any]) -> list[str]:
    """The Markdown cells of one `summarize` result."""
    best = _fmt(s["best_val_loss"], ".4f")
    if s["best_val_step"] is not None:
        best += f" (step {s['best_val_step']})"
    return [
        str(s["run"]).replace("|", "\\|"),
        str(s["steps"]),
        _fmt(s["final_loss"], ".4f"),
        _fmt(s["final_val_loss"], ".4f"),
        best,
        _fmt(s["tokens_per_s"], ",.0f"),
        _fmt(s["mfu"], ".1%"),
        format_duration(s["wall_time_s"]),
        s["layout"] or "n/a",
        s["dtype"] or "n/a",
    ]


HEADER = (
    "run",
    "steps",
    "final train loss",
    "final val loss",
    "best val loss",
    "mean tokens/s *",
    "mean MFU *",
    "wall time",
    "layout (dp_replicate x dp_shard x cp x tp x pp)",
    "dtype",
)


def summary_markdown(runs: list[Run], charts: list[str]) -> str:
    """The whole summary.md: the table, its notes, then the charts."""
    lines = ["# Training report", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "|".join(["---", *["---:"] * 7, "---", "---"]) + "|")
    lines += ["| " + " | ".join(summary_row(summarize(run))) + " |" for run in runs]
    lines += ["", f"\\* {NOTES[0]}", ""]
    for note in NOTES[1:]:
        lines += [note, ""]
    lines += moe_markdown(runs)
    lines += sync_markdown(runs)
    lines += mixture_markdown(runs)
    lines += ["## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Charts (PNG) and summary.md for the runs in `run_dirs`, in `out_dir`; returns the paths."""
    loaded = [(run, Path(d)) for d in run_dirs for run in load_runs(Path(d))]
    runs = _unique_names([run for run, _ in loaded], [d for _, d in loaded])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [line_chart(runs, chart, out_dir / chart.file) for chart in CHARTS]
    paths.append(step_time_chart(runs, out_dir / "step_time.png"))
    if has_moe(runs):
        moe_runs = [with_moe_max(run) for run in runs]
        paths.append(line_chart(moe_runs, MOE_CHART, out_dir / MOE_CHART.file))
    if has_mixture(runs):
        paths += mixture_charts(runs, out_dir)
    if has_sync(runs):
        paths.append(sync_chart(sync_curves(runs), out_dir / SYNC_FILE))
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(runs, [p.name for p in paths]), encoding="utf-8")
    return [*paths, summary]


def _unique_names(runs: list[Run], dirs: list[Path]) -> list[Run]:
    """Label runs that share a folder name by their parent folder too (a/run, b/run); a replica
    group's fault-tolerant run folder (`replica_of`) is renamed with it."""
    names = [run.name for run in runs]
    out: list[Run] = []
    for run, d in zip(runs, dirs, strict=True):
        name, folder = run.name, run.replica_of
        if names.count(name) > 1:
            prefix = d.resolve().parent.name
            name = f"{prefix}/{name}"
            folder = f"{prefix}/{folder}" if folder is not None else None
        while name in (r.name for r in out):
            name += "'"
            folder = f"{folder}'" if folder is not None else None
        out.append(dataclasses.replace(run, name=name, replica_of=folder))
    return out
