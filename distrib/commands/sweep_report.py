"""`distrib sweep report DIR`: what the search found, as Optuna's own charts, a table of the
trials and the best trial's config.

    <out>/summary.md                    the best trial, then one row per trial
    <out>/trials.csv                    the same table, for a spreadsheet
    <out>/history.png                   objective per trial, and the best so far
    <out>/intermediate.png              each trial's metric against steps: pruned trials end early
    <out>/parallel_coordinate.png       parameters against the objective
    <out>/importances.png               which parameters mattered (PED-ANOVA)
    <sweep dir>/best.toml               the best trial's config; trains into <sweep dir>/best
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from distrib.commands.sweep_folder import SweepSetup, load_setup, write_config
from distrib.commands.sweep_study import budget, open_study

BEST = "best.toml"


def _value(t: FrozenTrial) -> str:
    if t.value is not None:
        return f"{t.value:.4g}"
    last = t.intermediate_values
    return f"({last[max(last)]:.4g})" if last else ""


def _row(t: FrozenTrial, keys: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial": t.number,
        "state": t.state.name.lower(),
        "value": _value(t),
        "steps": t.user_attrs.get("steps", ""),
    }
    row.update({k: _fmt(t.params.get(k, "")) for k in keys})
    row["outcome"] = t.user_attrs.get("outcome", "")
    return row


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _charts(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    """Optuna's matplotlib charts; a chart the trials cannot support yet is noted, not fatal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    charts: dict[str, Callable[[], Any]] = {
        "history.png": lambda: vis.plot_optimization_history(study),
        "intermediate.png": lambda: vis.plot_intermediate_values(study),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study),
        "importances.png": lambda: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator()
        ),
    }
    written, notes = [], []
    for name, plot in charts.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            try:
                ax = plot()
            except (ValueError, RuntimeError) as err:
                notes.append(f"{name}: not drawn ({err})")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written, notes


def write_best(setup: SweepSetup, study: optuna.Study) -> Path | None:
    """`<sweep dir>/best.toml` from the best completed trial (None while there is none)."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    return write_config(
        setup.sweep_dir / BEST,
        setup,
        best.params,
        setup.sweep_dir / "best",
        f"best of sweep {setup.sweep_dir.name}: trial {best.number} ({setup.space.metric} {best.value:.4g})",
    )


def write_sweep_report(sweep_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the report; returns its files, summary.md first."""
    setup = load_setup(sweep_dir)
    study = open_study(setup.space, setup.sweep_dir)
    out = out or setup.sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    keys = [p.key for p in setup.space.params]
    trials = study.get_trials(deepcopy=False)
    rows = [_row(t, keys) for t in trials]
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(
            f, fieldnames=["trial", "state", "value", "steps", *keys, "outcome"]
        )
        writer.writeheader()
        writer.writerows(rows)
    charts, notes = _charts(study, out)
    best = write_best(setup, study)
    lines = _summary(setup, study, best, rows, keys, notes)
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / "summary.md", out / "trials.csv", *charts, *([best] if best else [])]


def _summary(
    setup: SweepSetup,
    study: optuna.Study,
    best: Path | None,
    rows: list[dict[str, Any]],
    keys: list[str],
    notes: list[str],
) -> list[str]:
    space = setup.space
    counts = {s.name.lower(): 0 for s in TrialState}
    for r in rows:
        counts[r["state"]] += 1
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [
        f"# Sweep {setup.sweep_dir}",
        "",
        f"{len(rows)} of {budget(space)} trials: {shown}. {space.sampler} sampler, "
        f"{space.pruner} pruner; objective: {space.goal} {space.metric} ({space.direction}).",
        "",
    ]
    if best is not None:
        t = study.best_trial
        params = ", ".join(f"{k} = {_fmt(v)}" for k, v in t.params.items())
        lines += [
            f"Best: trial {t.number}, {space.metric} {t.value:.4g} ({params}).",
            f"Its config: `{best}` (`distrib train --config {best}` trains it into "
            f"{setup.sweep_dir / 'best'}).",
            "",
        ]
    header = ["trial", "state", "value", "steps", *keys, "outcome"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    if notes:
        lines += ["", *notes]
    return lines
