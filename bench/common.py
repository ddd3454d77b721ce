"""Shared by the benchmarks: device description, timing, medians, and the results files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """perf_counter after the device has caught up."""
    sync(device)
    return time.perf_counter()


def foreign_cpu_seconds() -> float | None:
    """CPU seconds all other processes have used since boot (Linux), None where unknown.

    The difference over a timed step tells whether something else ran on the machine meanwhile:
    on a shared machine with few cores that can slow a step several-fold, so such steps are set
    aside rather than averaged in.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    mine = sum(int(f) for f in own[11:13])  # utime, stime of every thread of this process
    return (busy - mine) / ticks


def stamp(device: torch.device) -> tuple[float, float | None]:
    """(perf_counter after the device has caught up, foreign CPU seconds so far)."""
    sync(device)
    return time.perf_counter(), foreign_cpu_seconds()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """`cpu`, or the GPU's name in lower case with dashes (`nvidia-h100-80gb-hbm3`)."""
    if device.type != "cuda":
        return "cpu"
    return name_slug(device_name(device))


def name_slug(name: str) -> str:
    """A device name in lower case with dashes: `NVIDIA H100 NVL` -> `nvidia-h100-nvl`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: device, library versions, CPU count and threads."""
    try:
        import transformers

        hf_version: str | None = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": hf_version,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


def summarize(values: list[float]) -> dict[str, Any]:
    """All repeats, their median, and the spread (max - min) / median."""
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med if med else 0.0
    return {"repeats": values, "median": med, "spread": spread}


def write_result(kind: str, device: torch.device, record: dict[str, Any]) -> Path:
    """Write `bench/results/<kind>-<device slug>-<YYYY-MM-DD>.json`; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = RESULTS_DIR / f"{kind}-{device_slug(device)}-{day}.json"
    record = {"benchmark": kind, "date": day, **record}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def latest_result(kind: str, device: torch.device) -> tuple[Path, dict[str, Any]] | None:
    """The newest `<kind>-<slug>-*.json` for this device kind, if any."""
    paths = sorted(RESULTS_DIR.glob(f"{kind}-{device_slug(device)}-*.json"))
    if not paths:
        return None
    return paths[-1], json.loads(paths[-1].read_text())


def table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, padded to the widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
