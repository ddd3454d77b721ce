"""The Mixture-of-Experts section of `distrib report`, for runs whose metrics.jsonl rows carry the
per-layer `moe_*` keys (logged by models with MoE layers): each layer's load imbalance and
auxiliary losses at the latest logged step, and the trend of the worst layer's imbalance, as a
line in the summary and a chart."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from distrib.commands.report_charts import Chart
from distrib.commands.report_runs import Run, num, series

MAX_KEY = "moe_imbalance_max"
CHART = Chart(
    "moe_imbalance.png",
    "MoE load imbalance (worst layer)",
    "step",
    MAX_KEY,
    "step",
    "tokens on the busiest expert / mean",
)
NOTE = (
    "Imbalance: tokens routed to the busiest expert over the mean per expert, summed over the "
    "logging window and all ranks (1.0 is perfect balance; top-k routing over E experts can "
    "reach E / k at worst). Aux loss: the load-balancing loss E x sum(f_e x P_e), 1.0 at "
    "balance (computed and shown also when its coefficient is 0). z loss: the router z-loss, "
    "the mean squared log-sum-exp of the router logits."
)


@dataclass(frozen=True)
class MoeSummary:
    """One run's MoE figures: the latest logged step's per-layer values and the trend."""

    step: int
    imbalance: list[float]
    aux_loss: list[float] | None
    z_loss: list[float] | None
    first_block: int  # block index of the first MoE layer (model.moe_dense_layers)
    trend_steps: list[float]
    trend: list[float]  # the worst layer's imbalance at each logged step


def _floats(value: Any) -> list[float] | None:
    """A non-empty list of finite numbers, else None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value] if all(math.isfinite(v) for v in value) else None


def _with_max(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with `moe_imbalance_max`, derived from the per-layer list where missing."""
    layers = _floats(rec.get("moe_imbalance"))
    if num(rec, MAX_KEY) is not None or layers is None:
        return rec
    return {**rec, MAX_KEY: max(layers)}


def with_moe_max(run: Run) -> Run:
    """`run` with every record's worst-layer imbalance present where its layers are."""
    return dataclasses.replace(run, records=[_with_max(r) for r in run.records])


def moe_summary(run: Run) -> MoeSummary | None:
    """The run's MoE figures, or None when no record has per-layer imbalance."""
    latest = next((r for r in reversed(run.records) if _floats(r.get("moe_imbalance"))), None)
    if latest is None:
        return None
    steps, trend = series(with_moe_max(run).records, "step", MAX_KEY)
    first = run.config.get("model", {}).get("moe_dense_layers", 0)
    return MoeSummary(
        step=latest["step"],
        imbalance=_floats(latest["moe_imbalance"]) or [],
        aux_loss=_floats(latest.get("moe_aux_loss")),
        z_loss=_floats(latest.get("moe_z_loss")),
        first_block=first if isinstance(first, int) else 0,
        trend_steps=steps,
        trend=trend,
    )


def has_moe(runs: list[Run]) -> bool:
    return any(moe_summary(run) is not None for run in runs)


def _cell(values: list[float] | None, i: int, spec: str) -> str:
    return format(values[i], spec) if values is not None and i < len(values) else "n/a"


def layer_table(s: MoeSummary) -> list[str]:
    """Markdown rows: one per MoE layer at the latest logged step."""
    lines = ["| MoE layer (block) | imbalance | aux loss | z loss |", "|---|---:|---:|---:|"]
    for i, imbalance in enumerate(s.imbalance):
        aux, z = _cell(s.aux_loss, i, ".4f"), _cell(s.z_loss, i, ".4f")
        lines.append(f"| {i} ({s.first_block + i}) | {imbalance:.3f} | {aux} | {z} |")
    return lines


def trend_line(s: MoeSummary) -> str:
    """First, latest and peak of the worst layer's imbalance over the logged steps."""
    if not s.trend:
        return "Worst-layer imbalance: n/a"
    peak = max(range(len(s.trend)), key=s.trend.__getitem__)
    return (
        f"Worst-layer imbalance: {s.trend[0]:.3f} at step {s.trend_steps[0]:.0f} -> "
        f"{s.trend[-1]:.3f} at step {s.trend_steps[-1]:.0f}; peak {s.trend[peak]:.3f} at step "
        f"{s.trend_steps[peak]:.0f} ({len(s.trend)} logged step{'s' if len(s.trend) > 1 else ''})."
    )


def moe_markdown(runs: list[Run]) -> list[str]:
    """The summary's MoE section (no lines when no run has MoE metrics)."""
    found = [(run, moe_summary(run)) for run in runs]
    found = [(run, s) for run, s in found if s is not None]
    if not found:
        return []
    lines = ["## Mixture-of-Experts", "", NOTE, ""]
    for run, s in found:
        lines += [f"### {run.name}: latest logged step {s.step}", ""]
        lines += [*layer_table(s), "", trend_line(s), ""]
    return lines
