"""The synchronization section of `distrib report`, for runs whose records carry `sync_bytes` (the
cumulative bytes a rank all-reduced between fault-tolerant replica groups): loss against step
and against bytes communicated, one line per run, and a table of the bytes each run exchanged.

A fault-tolerant run folder holds one folder per replica group (`group0`, `group1`, ...), each
loaded as a run of its own (`report_runs.load_runs`); here the groups of one run make one line:
at each step that every group logged, the mean of their losses (each group trains on its share
of the global batch, so the mean is the loss of the whole batch) and the mean of their
`sync_bytes` (the same in every group while none restarts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.commands.report_runs import Run, num

FILE = "sync.png"
NOTE = (
    "Sync bytes: the bytes one rank all-reduced between replica groups (`sync_bytes`, "
    "cumulative), at the last step; per step is that over the steps. The loss of a "
    "fault-tolerant run is the mean over its replica groups at each step that all of them "
    "logged. The chart's bytes panel draws, for each level the cumulative bytes reach, the "
    "loss at its last step (before the next exchange), on a log axis: steps before the first "
    "exchange (0 bytes) are left out."
)


@dataclass(frozen=True)
class SyncCurve:
    """One run's loss and cumulative bytes communicated, step by step (its groups merged)."""

    name: str
    label: str
    sync: str | None
    sync_every: int | None
    sync_delay: int | None
    groups: int  # replica-group folders merged into this curve (1: a plain run folder)
    steps: list[int]
    loss: list[float]
    sync_bytes: list[float]

    @property
    def total_bytes(self) -> float | None:
        return self.sync_bytes[-1] if self.sync_bytes else None

    @property
    def bytes_per_step(self) -> float | None:
        if not self.steps or self.total_bytes is None:
            return None
        return self.total_bytes / self.steps[-1]

    def loss_at(self, step: int) -> float | None:
        """The loss at `step`, or at the last logged step before it (None before the first)."""
        before = [loss for s, loss in zip(self.steps, self.loss, strict=True) if s <= step]
        return before[-1] if before else None

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "sync": self.sync,
            "sync_every": self.sync_every,
            "sync_delay": self.sync_delay,
            "groups": self.groups,
            "steps": self.steps[-1] if self.steps else 0,
            "final_loss": self.loss[-1] if self.loss else None,
            "sync_bytes": self.total_bytes,
            "sync_bytes_per_step": self.bytes_per_step,
        }


def has_sync(runs: list[Run]) -> bool:
    return any(num(rec, "sync_bytes") is not None for run in runs for rec in run.records)


def _training(run: Run) -> dict[str, Any]:
    training = run.config.get("training", {})
    return training if isinstance(training, dict) else {}


def sync_label(name: str, config: dict[str, Any]) -> str:
    """`name (diloco, H=8, delay 4)`: the run's name and how its groups synchronized."""
    training = config.get("training", {})
    training = training if isinstance(training, dict) else {}
    sync = training.get("sync")
    if not isinstance(sync, str):
        return name
    parts = [sync]
    if sync != "every_step":
        parts.append(f"H={training.get('sync_every', '?')}")
        delay = training.get("sync_delay")
        if isinstance(delay, int) and delay > 0:
            parts.append(f"delay {delay}")
    return f"{name} ({', '.join(parts)})"


def _merge(name: str, group_runs: list[Run]) -> SyncCurve:
    """One curve from the runs of one run folder: the step-wise mean over the groups, at the
    steps every group logged with a loss and sync_bytes."""
    per_group = [
        {
            r["step"]: (loss, sent)
            for r in run.records
            if (loss := num(r, "loss")) is not None and (sent := num(r, "sync_bytes")) is not None
        }
        for run in group_runs
    ]
    steps = sorted(set.intersection(*(set(g) for g in per_group)))
    n = len(per_group)
    loss = [sum(g[s][0] for g in per_group) / n for s in steps]
    sent = [sum(g[s][1] for g in per_group) / n for s in steps]
    config = group_runs[0].config
    training = _training(group_runs[0])
    delay = training.get("sync_delay")
    every = training.get("sync_every")
    sync = training.get("sync")
    return SyncCurve(
        name=name,
        label=sync_label(name, config),
        sync=sync if isinstance(sync, str) else None,
        sync_every=every if isinstance(every, int) and sync not in (None, "every_step") else None,
        sync_delay=delay if isinstance(delay, int) and sync == "diloco" else None,
        groups=len(group_runs),
        steps=[int(s) for s in steps],
        loss=loss,
        sync_bytes=sent,
    )


def sync_curves(runs: list[Run]) -> list[SyncCurve]:
    """One curve per run folder whose records carry sync_bytes, in the runs' order: the groups
    of a fault-tolerant run folder (`Run.replica_of`) merged."""
    folders: dict[str, list[Run]] = {}
    for run in runs:
        if any(num(rec, "sync_bytes") is not None for rec in run.records):
            folders.setdefault(run.replica_of or run.name, []).append(run)
    return [_merge(name, group_runs) for name, group_runs in folders.items()]


def bytes_levels(curve: SyncCurve) -> list[tuple[float, float]]:
    """(bytes, loss) at the last step of each level of cumulative bytes above 0: the loss
    reached before the next exchange. Under local SGD or DiLoCo the bytes stay level for a
    round; every-step sync has a level per step."""
    levels: dict[float, float] = {}
    for sent, loss in zip(curve.sync_bytes, curve.loss, strict=True):
        if sent > 0:
            levels[sent] = loss
    return list(levels.items())


def sync_chart(curves: list[SyncCurve], path: Path) -> Path:
    """Two panels, one line per curve: loss vs step, and loss vs cumulative bytes communicated
    per rank (log axis; `bytes_levels`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter

    from distrib.commands.report_charts import _style

    fig = Figure(figsize=(12.0, 5.0), dpi=120, layout="constrained")
    by_step, by_bytes = fig.subplots(1, 2, sharey=True)
    for i, curve in enumerate(curves):
        style = _style(i)
        marker = "." if len(curve.steps) <= 60 else None
        by_step.plot(curve.steps, curve.loss, marker=marker, label=curve.label, **style)
        levels = bytes_levels(curve)
        if levels:
            xs, ys = zip(*levels, strict=True)
            by_bytes.plot(xs, ys, marker="." if len(xs) <= 60 else None, **style)
    by_step.set(title="Loss vs step", xlabel="step", ylabel="loss (mean over replica groups)")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_bytes.set(
        title="Loss vs bytes communicated",
        xlabel="bytes all-reduced between replica groups, per rank (cumulative)",
    )
    sent_all = [b for c in curves for b in c.sync_bytes if b > 0]
    if sent_all:
        by_bytes.set_xscale("log")
        by_bytes.xaxis.set_major_formatter(EngFormatter(unit="B"))
        # Within about a decade the powers of ten alone leave the axis bare: label 2x and 5x.
        few = max(sent_all) / min(sent_all) < 30
        by_bytes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0) if few else "auto"))
        by_bytes.xaxis.set_minor_formatter(EngFormatter(unit="B") if few else NullFormatter())
    for ax in (by_step, by_bytes):
        ax.grid(True, alpha=0.3, which="both")
    if curves:
        by_step.legend(loc="best", fontsize="small")
    fig.suptitle("Synchronization between replica groups")
    fig.savefig(path, format="png")
    return path


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def sync_markdown(runs: list[Run]) -> list[str]:
    """The summary's synchronization section (nothing when no run logged sync_bytes)."""
    curves = sync_curves(runs)
    if not curves:
        return []
    base = next((c.bytes_per_step for c in curves if c.sync == "every_step"), None)
    lines = ["## Synchronization between replica groups", ""]
    header = ["run", "sync", "H", "delay", "groups", "steps", "final loss", "sync bytes"]
    header += ["bytes / step", "vs every_step"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 8) + "|"]
    for c in curves:
        s = c.summary()
        per_step = s["sync_bytes_per_step"]
        ratio = f"{per_step / base:.3f}" if base and per_step is not None else "n/a"
        cells = [
            c.name.replace("|", "\\|"),
            s["sync"] or "n/a",
            "-" if s["sync_every"] is None else str(s["sync_every"]),
            "-" if s["sync_delay"] is None else str(s["sync_delay"]),
            str(s["groups"]),
            str(s["steps"]),
            "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}",
            _bytes(s["sync_bytes"]),
            _bytes(per_step),
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", NOTE, ""]
