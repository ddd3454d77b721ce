"""`distrib tune`: run the planner's best layouts for a few steps on this machine, compare
measured with predicted, write the fastest as a config and the measured efficiency as a devices
file that `distrib plan --devices` reads.

    distrib tune --config C --nproc 8 [--gpu h100] [--top 3] [--steps 20] [--dir tune]

Each trial is `distrib train` under `torchrun --standalone` (one node; on a cluster run tune
inside the allocation, e.g. from an `srun` step on one node) with the layout's keys, a few
steps, no checkpoints or evaluation, in `<dir>/<layout>`. Throughput is the median of the
logged steps after the first few (warm-up: allocation, compilation). Memory is the logged peak
(CUDA max allocated; on a CPU the process's RSS, which includes the runtime, so it is reported
but not compared).

Calibration: the median of measured / predicted tokens/s over the trials scales the device's
`matmul_efficiency` (and `float8_efficiency` when training in float8); the result is written
as `<dir>/devices.toml`, the device's table under its own key, so later plans on this device
use the measured efficiency: `distrib plan --devices <dir>/devices.toml --gpu KEY`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import torch

from distrib.commands.sweep_folder import write_config
from distrib.commands.sweep_trial import metric_by_step, train_command
from distrib.config import Config
from distrib.errors import ConfigError, UserError
from distrib.planning.hardware import Device, find_device, load_devices
from distrib.planning.search import NATIVE, Estimate, plan

WARMUP_STEPS = 3  # excluded from the measured throughput


@dataclass(frozen=True)
class TuneSetup:
    """The training config and overrides every trial starts from (`write_config`'s source)."""

    config: Path | None
    overrides: list[str]


def local_device(devices: dict[str, Device]) -> str:
    """The devices-file key of this machine's accelerator: the CUDA device whose name the
    table's name or key appears in, or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key, device in devices.items():
        if key in name or device.name.lower() in name:
            return key
    raise ConfigError(
        f"this GPU ({torch.cuda.get_device_name()}) is in no devices file: pass --gpu KEY, or "
        "--devices FILE with a table for it (format: distrib/planning/devices.toml)"
    )


def measured_tokens(run_dir: Path) -> float:
    """Median tokens/s per device over the logged steps after warm-up."""
    per_step = metric_by_step(run_dir, "tokens_per_s_per_device")
    steady = [v for step, v in sorted(per_step.items()) if step > WARMUP_STEPS]
    if not steady:
        raise UserError(
            f"{run_dir}: no step after the first {WARMUP_STEPS} was logged; raise --steps"
        )
    return statistics.median(steady)


def _peak_gb(run_dir: Path) -> float:
    return max(metric_by_step(run_dir, "memory_gb").values(), default=0.0)


def _trial(
    setup: TuneSetup, estimate: Estimate, folder: Path, nproc: int, steps: int, timeout: float
) -> dict:
    label = estimate.layout.label
    run_dir = folder / label
    params = {
        **_layout_keys(estimate),
        "training.steps": steps,
        "training.eval_every": 0,
        "checkpoint.interval": 0,
        "metrics.log_every": 1,
        "metrics.progress": False,
        "job.overwrite": True,
        "checkpoint.resume": "never",
    }
    config = write_config(folder / f"{label}.toml", setup, params, run_dir, f"tune {label}")
    done = subprocess.run(
        train_command(nproc, config), capture_output=True, text=True, timeout=timeout
    )
    result = {
        "layout": label,
        "config": str(config),
        "predicted_tokens_per_s_per_gpu": estimate.tokens_per_s_per_gpu,
        "predicted_memory_gb": estimate.memory.total / 1e9,
        "exit_code": done.returncode,
    }
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout)[-2000:]
        return result
    tokens = measured_tokens(run_dir)
    result |= {
        "measured_tokens_per_s_per_gpu": tokens,
        "measured_memory_gb": _peak_gb(run_dir),
        "speed_error": estimate.tokens_per_s_per_gpu / tokens - 1,
    }
    return result


def _layout_keys(e: Estimate) -> dict[str, object]:
    lay = e.layout
    return {
        "parallel.dp_replicate": lay.dp_replicate,
        "parallel.dp_shard": lay.dp_shard,
        "parallel.cp": lay.cp,
        "parallel.tp": lay.tp,
        "parallel.pp": lay.pp,
        "parallel.ep": lay.ep,
        "parallel.engine": "native" if lay.zero == NATIVE else "deepspeed",
        **({"parallel.zero_stage": lay.zero} if lay.zero != NATIVE else {}),
        "parallel.offload_optimizer": lay.offload in ("optimizer", "all"),
        "parallel.offload_params": lay.offload == "all",
        "parallel.activation_checkpoint": lay.ac,
        "training.micro_batch_size": lay.micro_batch_size,
    }


def calibrated(device: Device, results: list[dict], float8: bool) -> Device:
    """`device` with its efficiency scaled by the median measured / predicted speed."""
    ratios = [
        r["measured_tokens_per_s_per_gpu"] / r["predicted_tokens_per_s_per_gpu"]
        for r in results
        if "measured_tokens_per_s_per_gpu" in r
    ]
    if not ratios:
        return device
    ratio = statistics.median(ratios)
    if float8:
        return dataclasses.replace(device, float8_efficiency=device.float8_efficiency * ratio)
    return dataclasses.replace(device, matmul_efficiency=device.matmul_efficiency * ratio)


def run_tune(
    cfg: Config,
    setup: TuneSetup,
    nproc: int,
    folder: Path,
    gpu: str | None = None,
    devices_file: Path | None = None,
    top: int = 3,
    steps: int = 20,
    timeout: float = 1800.0,
) -> str:
    """Plan, run the best `top` layouts that fit, write results.json, best.toml and
    devices.toml into `folder`; returns the printed summary."""
    if nproc < 1 or top < 1 or steps <= WARMUP_STEPS:
        raise ConfigError(
            f"--nproc and --top must be >= 1 and --steps > {WARMUP_STEPS} (the warm-up steps "
            f"left out of the measurement); got {nproc}, {top}, {steps}"
        )
    devices = load_devices(devices_file)
    device = find_device(gpu or local_device(devices), devices)
    fitting = [e for e in plan(cfg, nproc, device, nproc) if e.fits][:top]
    if not fitting:
        raise ConfigError(f"no layout of this config fits {nproc} x {device.name}")
    folder.mkdir(parents=True, exist_ok=True)
    results = [_trial(setup, e, folder, nproc, steps, timeout) for e in fitting]
    measured = [r for r in results if "measured_tokens_per_s_per_gpu" in r]
    tuned = calibrated(device, measured, cfg.training.float8)
    table = {k: v for k, v in dataclasses.asdict(tuned).items() if k != "key"}
    (folder / "devices.toml").write_text(tomli_w.dumps({device.key: table}))
    lines = [f"{'layout':<40} {'predicted':>10} {'measured':>10} {'error':>7}  tok/s/GPU"]
    for r in results:
        got = r.get("measured_tokens_per_s_per_gpu")
        lines.append(
            f"{r['layout']:<40} {r['predicted_tokens_per_s_per_gpu']:>10,.0f} "
            + (f"{got:>10,.0f} {r['speed_error']:>+7.0%}" if got else f"{'failed':>10}")
        )
    summary = {"device": device.key, "nproc": nproc, "steps": steps, "trials": results}
    if measured:
        best = max(measured, key=lambda r: r["measured_tokens_per_s_per_gpu"])
        chosen = next(e for e in fitting if e.layout.label == best["layout"])
        # The user's own config with the fastest layout: their steps, their run folder.
        best_path = write_config(
            folder / "best.toml",
            setup,
            _layout_keys(chosen),
            Path(cfg.job.run_dir),
            cfg.job.description or f"tuned layout {best['layout']}",
        )
        summary["best"] = best["layout"]
        lines.append(f"\nfastest: {best['layout']} -> {best_path}")
    summary["calibrated"] = {
        "matmul_efficiency": tuned.matmul_efficiency,
        "float8_efficiency": tuned.float8_efficiency,
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=2))
    lines.append(
        f"calibrated {device.key}: matmul_efficiency {device.matmul_efficiency:.3g} -> "
        f"{tuned.matmul_efficiency:.3g} in {folder / 'devices.toml'} (distrib plan --devices)"
    )
    return "\n".join(lines)
