"""bench/mfu.py's report: the table, the figure to quote, the GPU-over-CPU speed-up and the
MFU target's verdict; and a summary of result files:

    python -m bench.mfu_report DIR/mfu-*.json     # one line per file: best figure and verdict

Verdicts: `PASS` / `FAIL` only when every planned row ran; `incomplete` when some did not
(a time limit left them `not_run`, or one was cut off at its `timeout`), whatever the MFU so
far; `unknown peak` when the GPU's peak TFLOP/s is not in distrib's table (MFU undefined:
pass `--metrics.peak_tflops`); `n/a` where the target does not apply (not the 1b preset, or
not on a CUDA GPU outside a dry run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import table
from bench.mfu_plan import NOT_MEASURED, Setting, best_row, plan_complete

TARGET_MFU = 0.55  # the goal: the 1b preset on one H100
TARGET_NAME = "MFU >= 55% (1b preset, one H100)"


def fmt(row: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    value = row.get(key)
    return "-" if value is None else format(scale * value, spec)


def print_table(rows: list[dict[str, Any]], cuda: bool) -> None:
    header = ["stage", "compile", "attn", "chunk", "fp8", "AC", "mb", "status", "tokens/s"]
    header += ["step ms", "TFLOP/s", "MFU", "mem GB" if cuda else "RSS GB"]
    lines = [header]
    for r in rows:
        ok = r["status"] == "ok"
        mem = r.get("memory_gb") if ok or cuda else None
        figures = [
            fmt(r, "tokens_per_s", ",.0f"),
            fmt(r, "step_ms_median", ".1f"),
            fmt(r, "tflops", ".3g"),
            fmt(r, "mfu", ".1f", 100) + ("%" if r.get("mfu") else ""),
        ]
        cells = Setting(**r["setting"]).cells()
        mem_cell = "-" if mem is None else f"{mem:.2f}"
        lines.append([r["stage"], *cells, r["status"], *(figures if ok else ["-"] * 4), mem_cell])
    print(table(lines))
    for r in rows:
        if r["status"] != "ok":
            label = Setting(**r["setting"]).label()
            print(f"  {r['stage']} {label}: {r['status']}: {r.get('reason', '')[:300]}")


def quoted_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The figure to quote: the best setting's fresh re-run (no winner's curse from picking
    the maximum of noisy rows), or the best row where that re-run did not happen."""
    again = [r for r in rows if r["stage"] == "best" and r["status"] == "ok"]
    return again[-1] if again else best_row(rows)


def rerun_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The best setting's re-run over its first run: how far the same setting moves between
    two fresh processes, i.e. the noise that differences between rows must exceed."""
    again, first = quoted_best(rows), best_row(rows)
    if again is None or first is None or again["stage"] != "best":
        return None
    return again["tokens_per_s"] / first["tokens_per_s"]


def speedup_over_cpu(rows: list[dict[str, Any]], cpu: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of each GPU row over the CPU row of the same setting, and best over best."""
    cpu_rows = {
        json.dumps(r["setting"], sort_keys=True): r
        for r in cpu["rows"]
        if r["status"] == "ok" and r["stage"] != "best"
    }
    per = []
    for r in rows:
        c = cpu_rows.get(json.dumps(r["setting"], sort_keys=True))
        if r["status"] == "ok" and c and r["stage"] != "best":
            per.append(
                {
                    "setting": r["setting"],
                    "gpu_tokens_per_s": r["tokens_per_s"],
                    "cpu_tokens_per_s": c["tokens_per_s"],
                    "speedup": r["tokens_per_s"] / c["tokens_per_s"],
                }
            )
    gpu_best, cpu_best = quoted_best(rows), cpu.get("best")
    best = None
    if gpu_best and cpu_best:
        best = gpu_best["tokens_per_s"] / cpu_best["tokens_per_s"]
    return {"per_setting": per, "best_over_best": best}


def verdict(applies: bool, best: dict[str, Any] | None, complete: bool) -> str:
    """PASS / FAIL / incomplete / unknown peak / n/a (see the module's docstring)."""
    if not applies:
        return "n/a"
    if best is not None and not best.get("peak_tflops"):
        return "unknown peak"
    if not complete:
        return "incomplete"
    mfu = best.get("mfu") if best else None
    return "PASS" if mfu is not None and mfu >= TARGET_MFU else "FAIL"


def target(
    preset: str, judged: bool, gpu_name: str | None, rows: list[dict[str, Any]], finished: bool
) -> dict[str, Any]:
    """The MFU target: judged for the 1b preset where `judged` (on CUDA, or in a dry run).
    `finished`: the plan's walk returned (a JSON written midway is incomplete)."""
    applies = preset == "1b" and judged
    best = quoted_best(rows)
    complete = finished and plan_complete(rows)
    word = verdict(applies, best, complete)
    notes = {
        "n/a": "only the 1b preset on a CUDA GPU is judged",
        "unknown peak": f"no peak TFLOP/s for '{gpu_name}' in distrib.train.metrics."
        "PEAK_TFLOPS; rerun with --metrics.peak_tflops=N (dense bf16) to judge",
        "incomplete": "not every planned row ran: no verdict on a cut-short plan",
    }
    return {
        TARGET_NAME: {
            "threshold": TARGET_MFU,
            "mfu": best.get("mfu") if best else None,
            "peak_tflops": best.get("peak_tflops") if best else None,
            "applicable": applies,
            "gpu": gpu_name,
            "on_h100": bool(gpu_name and "H100" in gpu_name),
            "complete": complete,
            "rows_not_measured": sum(r["status"] in NOT_MEASURED for r in rows),
            "verdict": word,
            "pass": {"PASS": True, "FAIL": False}.get(word),
            "note": notes.get(word),
        }
    }


def verdict_line(name: str, t: dict[str, Any]) -> str:
    mfu = "-" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
    if t["verdict"] == "incomplete":
        return f"{name}: incomplete (best MFU so far {mfu}; {t['rows_not_measured']} planned rows not measured)"
    return f"{name}: {t['verdict']} (best MFU {mfu})"


def summary(paths: list[Path]) -> list[str]:
    """One line per result file: preset, device, best tokens/s and MFU, the verdict."""
    lines = []
    for path in paths:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            lines.append(f"{path.name}: unreadable ({err})")
            continue
        best = rec.get("best") or {}
        state = "finished" if rec.get("finished") else "NOT finished (killed midway?)"
        tok = fmt(best, "tokens_per_s", ",.0f")
        head = f"{path.name}: preset {rec.get('preset')}, {rec.get('gpu_name') or 'cpu'}, {state}"
        lines.append(f"{head}; best {tok} tokens/s")
        for name, t in rec.get("targets", {}).items():
            lines.append("  " + verdict_line(name, t))
    return lines


if __name__ == "__main__":
    print("\n".join(summary([Path(p) for p in sys.argv[1:]])) or "no result files")
