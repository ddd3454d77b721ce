"""`distrib report`: charts and a summary table from the run folders of one or more runs.

Reads only what a run folder holds (`config.json`, `metrics.jsonl`), so it works on runs from any
machine, finished, crashed or still going. Keys that older runs lack, or logged as null, leave
their series out rather than fail. Figures are drawn with matplotlib's object API on the Agg
canvas (no pyplot), so nothing global is touched and no display is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.errors import UserError

AXES = ("dp_replicate", "dp_shard", "tp", "pp")
TIME_KEYS = {
    "time_data_s": "data",
    "time_forward_backward_s": "forward + backward",
    "time_optimizer_s": "optimizer",
    "time_checkpoint_s": "checkpoint",
}
TIME_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
LINESTYLES = ("-", "--", ":", "-.")

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


@dataclass
class Run:
    """One run folder: its config and its records, one per logged step."""

    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]  # sorted by step; a repeated step keeps its last occurrence
    first_window_steps: frozenset[int] = frozenset()  # logged first after a (re)start
    wall_time_s: float | None = None  # elapsed_s summed over (re)starts, in file order


@dataclass(frozen=True)
class Chart:
    """One line chart: `y` against `x` for every run, one line each."""

    file: str
    title: str
    x: str
    y: str
    xlabel: str
    ylabel: str
    scale: float = 1.0
    val_markers: bool = False  # add val_loss as markers in the run's colour
    eng_x: bool = False  # engineering notation (12k, 3M) on the axis
    eng_y: bool = False
    hint: str = ""  # shown under "no data" on an empty chart


CHARTS = (
    Chart("loss_vs_step.png", "Loss", "step", "loss", "step", "loss", val_markers=True),
    Chart(
        "loss_vs_tokens.png",
        "Loss vs tokens trained on",
        "tokens",
        "loss",
        "tokens",
        "loss",
        val_markers=True,
        eng_x=True,
    ),
    Chart("lr.png", "Learning rate", "step", "lr", "step", "learning rate"),
    Chart(
        "throughput.png",
        "Throughput (all devices)",
        "step",
        "tokens_per_s",
        "step",
        "tokens/s",
        eng_y=True,
    ),
    Chart(
        "mfu.png",
        "Model FLOPs utilization",
        "step",
        "mfu",
        "step",
        "MFU (%)",
        scale=100.0,
        hint="MFU is null where the device's peak TFLOP/s is unknown (CPU):\n"
        "set metrics.peak_tflops",
    ),
    Chart("memory.png", "Peak memory per rank", "step", "memory_gb", "step", "memory (GiB)"),
)


# ---------------------------------------------------------------------------------------------
# Loading


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


# ---------------------------------------------------------------------------------------------
# Summary


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
    """dp_replicate x dp_shard x tp x pp; a -1 degree is inferred from the logged device count."""
    parallel = run.config.get("parallel", {})
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
    "layout (dp_replicate x dp_shard x tp x pp)",
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
    lines += ["## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Charts


def _figure(height: float = 5.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8.0, height), dpi=120, layout="constrained")


def _style(i: int) -> dict[str, str]:
    """Colour and line style of the i-th run: ten colours, then the next line style."""
    return {"color": f"C{i % 10}", "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]}


def _no_data(ax: Any, hint: str) -> None:
    text = "no data" + (f"\n{hint}" if hint else "")
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray")


def line_chart(runs: list[Run], chart: Chart, path: Path) -> Path:
    """Draw `chart` with one line per run (and val-loss markers) and save it to `path`."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    handles, has_val = [], False
    for i, run in enumerate(runs):
        style = _style(i)
        xs, ys = series(run.records, chart.x, chart.y)
        if xs:
            marker = "." if len(xs) <= 60 else None
            ys = [y * chart.scale for y in ys]
            handles += ax.plot(xs, ys, marker=marker, label=run.name, **style)
        vx, vy = series(run.records, chart.x, "val_loss") if chart.val_markers else ([], [])
        if vx:
            ax.plot(vx, vy, "o", color=style["color"], markerfacecolor="white", markersize=6)
            has_val = True
            if not xs:  # the run still needs its legend entry
                handles.append(Line2D([], [], label=run.name, **style))
    if has_val:
        handles.append(Line2D([], [], color="gray", label="train loss"))
        handles.append(
            Line2D([], [], color="gray", marker="o", ls="", mfc="white", label="val loss")
        )
    ax.set(title=chart.title, xlabel=chart.xlabel, ylabel=chart.ylabel)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small")
        ax.grid(True, alpha=0.3)
    else:
        _no_data(ax, chart.hint)
    if chart.x == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if chart.eng_x:
        ax.xaxis.set_major_formatter(EngFormatter())
    if chart.eng_y:
        ax.yaxis.set_major_formatter(EngFormatter())
    fig.savefig(path, format="png")
    return path


def step_time_chart(runs: list[Run], path: Path) -> Path:
    """One stacked-area subplot per run: mean seconds per step spent in each phase."""
    fig = _figure(max(4.0, 2.8 * len(runs)))
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for run, ax in zip(runs, axes, strict=True):
        _stack_step_time(run, ax)
        ax.set(title=run.name, ylabel="seconds / step")
    axes[-1].set_xlabel("step")
    fig.suptitle("Step time breakdown (mean per step over each logging window)")
    fig.savefig(path, format="png")
    return path


def _stack_step_time(run: Run, ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    recs = [r for r in run.records if any(num(r, k) is not None for k in TIME_KEYS)]
    keys = [k for k in TIME_KEYS if any(num(r, k) is not None for r in recs)]
    if not keys:
        _no_data(ax, "the run logged no time_* keys")
        return
    steps = [r["step"] for r in recs]
    # A phase missing from one record counts as 0 there, so the stack stays aligned.
    layers = [[num(r, k) or 0.0 for r in recs] for k in keys]
    colors = [TIME_COLORS[list(TIME_KEYS).index(k)] for k in keys]
    labels = [TIME_KEYS[k] for k in keys]
    if len(steps) == 1:  # an area needs two points: draw the one window as a stacked bar
        bottom = 0.0
        for layer, color, label in zip(layers, colors, labels, strict=True):
            ax.bar(steps, layer, bottom=bottom, color=color, label=label, width=0.6)
            bottom += layer[0]
    else:
        ax.stackplot(steps, layers, colors=colors, labels=labels, alpha=0.85)
    handles, names = ax.get_legend_handles_labels()
    # Outside the axes, top phase first, as stacked.
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Charts (PNG) and summary.md for the runs in `run_dirs`, in `out_dir`; returns the paths."""
    runs = _unique_names([load_run(Path(d)) for d in run_dirs], [Path(d) for d in run_dirs])
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [line_chart(runs, chart, out_dir / chart.file) for chart in CHARTS]
    paths.append(step_time_chart(runs, out_dir / "step_time.png"))
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(runs, [p.name for p in paths]), encoding="utf-8")
    return [*paths, summary]


def _unique_names(runs: list[Run], dirs: list[Path]) -> list[Run]:
    """Label runs that share a folder name by their parent folder too (a/run, b/run)."""
    names = [run.name for run in runs]
    out = []
    for run, d in zip(runs, dirs, strict=True):
        name = run.name
        if names.count(name) > 1:
            name = f"{d.resolve().parent.name}/{name}"
        while name in (r.name for r in out):
            name += "'"
        out.append(dataclasses.replace(run, name=name))
    return out
