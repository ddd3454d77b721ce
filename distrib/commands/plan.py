"""`distrib plan`: the layouts of a config on N GPUs that fit, ranked by predicted speed.

    distrib plan --config configs/llama3_8b.toml --gpus 64 --gpu h100
    distrib plan --config C --gpus 64 --explain dp_shard=32,tp=2,ac=selective,mbs=1

See docs/planning.md for the model behind the figures and its measured error.
"""

from __future__ import annotations

from pathlib import Path

from distrib.config import Config
from distrib.errors import ConfigError
from distrib.planning.hardware import Device, find_device, load_devices
from distrib.planning.search import Estimate, estimate, parse_layout, plan

GB = 1e9


def _row(rank: int, e: Estimate) -> list[str]:
    m = e.memory
    return [
        str(rank),
        e.layout.label,
        f"{m.total / GB:.1f}",
        f"{(m.params + m.grads + m.optimizer) / GB:.1f}",
        f"{(m.activations + m.recompute) / GB:.1f}",
        f"{m.logits / GB:.1f}",
        f"{e.tokens_per_s_per_gpu:,.0f}",
        f"{e.mfu:.1%}",
        f"{e.time.total:.2f}",
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def explain(e: Estimate, device: Device) -> str:
    """Every term of one layout's prediction, with its arithmetic."""
    m = e.memory
    lines = [f"layout {e.layout.label} on {device.name}", "", "memory per GPU (busiest rank):"]
    for name in ("params", "grads", "optimizer", "activations", "logits", "recompute", "gathered"):
        lines.append(f"  {name:<12}{getattr(m, name) / GB:9.2f} GB")
    lines.append(
        f"  peak        {m.total / GB:9.2f} GB = params + optimizer + gathered + max(activations "
        "+ logits, activations + recompute + grads)"
    )
    if m.host:
        lines.append(
            f"  host        {m.host / GB:9.2f} GB (offloaded by DeepSpeed, not on the GPU)"
        )
    if e.layout.zero >= 0:
        lines.append(
            "  (DeepSpeed: optimizer = float32 master weights + moments of this rank's ZeRO "
            "partition; gathered = ZeRO-3's reduce bucket, persistent parameters, gathered "
            "block and prefetch; ZeRO-1/2's reduce bucket lives in backward, under recompute)"
        )
    verdict = "fits" if e.fits else "does NOT fit"
    lines.append(
        f"  + {device.reserved_gb:.0f} GB reserved (CUDA context, NCCL, fragmentation): "
        f"{verdict} in {device.memory_gb:.0f} GB"
    )
    lines += ["", "step time:"] + [f"  {line}" for line in e.time.lines]
    lines.append(
        f"  total {e.time.total:.3f} s -> {e.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
        f"MFU {e.mfu:.1%}"
    )
    return "\n".join(lines)


def run_plan(
    cfg: Config,
    gpus: int,
    gpu: str,
    gpu_memory: float = 0.0,
    nodes: int = 0,
    gpus_per_node: int = 0,
    devices_file: Path | None = None,
    top: int = 15,
    explain_layout: str | None = None,
) -> str:
    """The text `distrib plan` prints."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    device = find_device(gpu, load_devices(devices_file), gpu_memory)
    if nodes > 0:
        if gpus % nodes:
            raise ConfigError(f"--gpus {gpus} does not split over --nodes {nodes}")
        gpus_per_node = gpus // nodes
    per_node = gpus_per_node or min(device.gpus_per_node, gpus)
    if explain_layout is not None:
        return explain(estimate(cfg, parse_layout(explain_layout), gpus, device, per_node), device)
    found = plan(cfg, gpus, device, per_node)
    if not found:
        raise ConfigError(
            f"no layout of this config runs on {gpus} GPUs (every candidate was refused by the "
            "config's validation: check the global batch, heads and sequence length)"
        )
    fitting = [e for e in found if e.fits]
    head = (
        f"{cfg.model.n_layers} layers x dim {cfg.model.dim}, seq {cfg.data.seq_len}, global "
        f"batch {cfg.training.global_batch_size}, {cfg.training.dtype}; {gpus} x {device.name} "
        f"({per_node} per node); {len(found)} valid layouts, {len(fitting)} fit"
    )
    header = ["#", "layout", "GB/GPU", "states", "activ.", "logits", "tok/s/GPU", "MFU", "step s"]
    shown = fitting[:top] if fitting else sorted(found, key=lambda e: e.memory.total)[:top]
    rows = [header] + [_row(i + 1, e) for i, e in enumerate(shown)]
    note = "" if fitting else "\nnone fits: the smallest are listed; add GPUs or memory."
    return f"{head}\n\n{_table(rows)}{note}\n\n`--explain LAYOUT` shows one layout's arithmetic."
