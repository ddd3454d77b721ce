"""The charts of `distrib report`: one line chart per metric for every run, and the step-time
breakdown. Drawn with matplotlib's object API on the Agg canvas (no pyplot), so nothing global
is touched and no display is needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.commands.report_runs import Run, num, series

TIME_KEYS = {
    "time_data_s": "data",
    "time_forward_backward_s": "forward + backward",
    "time_optimizer_s": "optimizer",
    "time_checkpoint_s": "checkpoint",
}
TIME_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
LINESTYLES = ("-", "--", ":", "-.")


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
