"""bench/moe.py's figures: tokens/s per contender over its repeats, the MoE / dense ratios, and
the printed table."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from bench.common import summarize, table
from distrib.config import Config
from distrib.train.metrics import active_matmul_params, flops_per_token, peak_tflops


def tokens_per_s(run: dict[str, Any], tokens: int) -> float:
    """Tokens per step over the median undisturbed step (all steps when fewer than 3)."""
    clean = run["clean_step_s"]
    return tokens / statistics.median(clean if len(clean) >= 3 else run["step_s"])


def contender_figures(
    cfg: Config, skipped: str | None, runs: list[dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """tokens/s over the repeats (median, spread), and on CUDA TFLOP/s, MFU and memory."""
    tokens = cfg.training.global_batch_size * cfg.data.seq_len
    out: dict[str, Any] = {"kernel": cfg.model.moe_kernel if cfg.model.moe_experts else None}
    out |= {"active_matmul_params": active_matmul_params(cfg.model), "runs": runs}
    if skipped:
        return out | {"status": "skipped", "reason": skipped}
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return out | {"status": runs[0]["status"] if runs else "not_run"}
    for r in ok:
        r["tokens_per_s"] = tokens_per_s(r, tokens)
        r["undisturbed"] = len(r["clean_step_s"]) >= 3
    # A repeat with fewer than 3 undisturbed steps was slowed by other processes: left out
    # while some repeat was not.
    kept = [r for r in ok if r["undisturbed"]] or ok
    rates = [r["tokens_per_s"] for r in kept]
    out |= {"status": "ok", "tokens_per_s": summarize(rates), "total_params": ok[0]["total_params"]}
    out["repeats_kept"] = f"{len(kept)}/{len(runs)}"
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_tflops(device, cfg.training.dtype, cfg.metrics.peak_tflops)
    out["tflops"] = out["tokens_per_s"]["median"] * fpt / 1e12
    out["mfu"] = out["tflops"] / peak if peak else None
    if device.type == "cuda":
        out["memory_gb"] = max(r["memory_gb"] for r in ok)
    return out


PAIRS = (("moe_loop", "dense"), ("moe_grouped_mm", "dense"), ("moe_grouped_mm", "moe_loop"))


def ratios(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each MoE contender's tokens/s over the dense twin's (and grouped_mm over loop): the
    ratio of the medians, and the median of the ratios within each repeat (paired runs ran
    back to back, so they shared the machine's state: the figure to trust when it is busy),
    over the repeats where neither was disturbed if there are such."""
    ok = {k: f for k, f in figures.items() if f["status"] == "ok"}
    out = {}
    for a, b in ((a, b) for a, b in PAIRS if a in ok and b in ok):
        runs = zip(ok[a]["runs"], ok[b]["runs"], strict=False)
        both = [(x, y) for x, y in runs if "tokens_per_s" in x and "tokens_per_s" in y]
        both = [(x, y) for x, y in both if x.get("undisturbed") and y.get("undisturbed")] or both
        paired = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in both]
        out[f"{a}/{b}"] = {
            "of_medians": ok[a]["tokens_per_s"]["median"] / ok[b]["tokens_per_s"]["median"],
            "paired_median": statistics.median(paired) if paired else None,
            "paired": paired,
        }
    return out


def throughput_table(figures: dict[str, dict[str, Any]], cuda: bool) -> str:
    head = ["contender", "active params", "total params", "tokens/s", "spread", "repeats"]
    rows = [head + (["TFLOP/s", "MFU", "memory GB"] if cuda else [])]
    for name, f in figures.items():
        if f["status"] != "ok":
            rows.append([name, f"{f['active_matmul_params']:,}", "-", f["status"], "-", "-"])
            rows[-1] += ["-"] * (3 if cuda else 0)
            continue
        t = f["tokens_per_s"]
        row = [name, f"{f['active_matmul_params']:,}", f"{f['total_params']:,}"]
        row += [f"{t['median']:,.0f}", f"{t['spread']:.1%}", f["repeats_kept"]]
        if cuda:
            mfu = "n/a" if f["mfu"] is None else f"{f['mfu']:.1%}"
            row += [f"{f['tflops']:.1f}", mfu, f"{f['memory_gb']:.1f}"]
        rows.append(row)
    return table(rows)
