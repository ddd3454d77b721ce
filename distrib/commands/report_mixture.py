"""The data-mixture section of `distrib report`, for runs whose records carry per-source keys
(`val_loss/<name>` at evaluations, `data_share/<name>` at logged steps): each source's last
validation loss and realised share in the summary, and two charts, validation loss per source
and the realised shares, one line per run and source."""

from __future__ import annotations

from pathlib import Path

from distrib.commands.report_charts import _figure, _no_data, _style
from distrib.commands.report_runs import Run, series

VAL, PPL, SHARE = "val_loss/", "val_ppl/", "data_share/"


def source_names(run: Run) -> list[str]:
    """The run's sources, in the order its records first name them."""
    names: list[str] = []
    for rec in run.records:
        for key in rec:
            if key.startswith((VAL, SHARE)):
                name = key.split("/", 1)[1]
                if name not in names:
                    names.append(name)
    return names


def has_mixture(runs: list[Run]) -> bool:
    return any(source_names(run) for run in runs)


def _last(run: Run, key: str) -> float | None:
    _, ys = series(run.records, "step", key)
    return ys[-1] if ys else None


def mixture_markdown(runs: list[Run]) -> list[str]:
    """The summary's mixture section (no lines when no run mixes sources)."""
    found = [(run, source_names(run)) for run in runs if source_names(run)]
    if not found:
        return []
    lines = [
        "## Data mixture",
        "",
        "Per source: the last validation loss and perplexity, and the share of the training "
        "sequences drawn from it so far (realised, at the last logged step).",
        "",
        "| run | source | val loss | val ppl | share |",
        "|---|---|---:|---:|---:|",
    ]
    for run, names in found:
        for name in names:
            val, share = _last(run, VAL + name), _last(run, SHARE + name)
            ppl = _last(run, PPL + name)
            cells = [
                run.name,
                name,
                "" if val is None else f"{val:.4f}",
                "" if ppl is None else f"{ppl:.1f}",
                "" if share is None else f"{share:.1%}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def mixture_charts(runs: list[Run], out_dir: Path) -> list[Path]:
    """val_loss_by_source.png and data_shares.png."""
    paths = []
    for prefix, file, title, ylabel in (
        (VAL, "val_loss_by_source.png", "Validation loss per source", "val loss"),
        (SHARE, "data_shares.png", "Realised share of each source", "share of sequences"),
    ):
        fig = _figure()
        ax = fig.add_subplot()
        i = 0
        for run in runs:
            for name in source_names(run):
                xs, ys = series(run.records, "step", prefix + name)
                if xs:
                    label = name if len(runs) == 1 else f"{run.name}: {name}"
                    ax.plot(xs, ys, marker="." if len(xs) <= 60 else None, label=label, **_style(i))
                    i += 1
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if i:
            ax.legend(loc="best", fontsize="small")
            ax.grid(True, alpha=0.3)
        else:
            _no_data(ax, "")
        fig.savefig(out_dir / file, format="png")
        paths.append(out_dir / file)
    return paths
