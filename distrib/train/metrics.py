"""What a run measures (throughput, FLOPs, MFU, memory) and where it goes (progress bar,
metrics.jsonl, TensorBoard, W&B). Only rank 0 writes; every rank may measure."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distrib.config import MetricsConfig, ModelConfig
from distrib.config.families import moe_layer_count, resolved_head_dim, resolved_moe_ffn_dim
from distrib.errors import ConfigError

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: (bfloat16, float32 via TF32
# tensor cores). Matched by substring of the CUDA device name, most specific first. Hopper, from
# NVIDIA's H100 and H200 Tensor Core GPU data sheets, which quote the sparse rate (halved here):
# SXM (H100, H200, GH200) BF16 1,979 / TF32 989; H100 NVL and H200 NVL 1,671 / 835; H100 PCIe
# 1,513 / 756. Device names: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 NVL", "NVIDIA H100
# PCIe", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB".
PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    ("GH200", (989.0, 494.0)),
    ("H200 NVL", (835.0, 417.0)),
    ("H200", (989.0, 494.0)),
    ("H100 NVL", (835.0, 417.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),
    ("H800", (989.0, 494.0)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("A800", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)),
    ("RTX 4090", (165.0, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
    ("MI300X", (1307.0, 654.0)),
]


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token.

    6 x the parameters that take part in matrix products for this token (every linear layer and
    the output head; not the embedding lookup, not norms; in an MoE layer the router and the
    top-k experts the token visits, plus shared experts: active, not total, parameters), plus
    attention's score and value products: per layer 2 x 2 x context x heads x head_dim forward,
    x3 with backward. The context is the sequence (the window, if shorter); the causal mask is
    not discounted (the PaLM / torchtitan convention), so MFU figures compare across frameworks.
    """
    context = min(seq_len, model.sliding_window) if model.sliding_window > 0 else seq_len
    attention = 12.0 * model.n_layers * context * model.n_heads * resolved_head_dim(model)
    return 6.0 * active_matmul_params(model) + attention


def active_matmul_params(model: ModelConfig) -> int:
    """Weights one token multiplies by in a forward pass (see `flops_per_token`)."""
    d, hd = model.dim, resolved_head_dim(model)
    attn = 2 * d * model.n_heads * hd + 2 * d * model.n_kv_heads * hd
    n_moe = moe_layer_count(model)
    expert = 3 * d * resolved_moe_ffn_dim(model)
    moe_ffn = d * model.moe_experts + (model.moe_top_k + model.moe_shared_experts) * expert
    return (
        model.n_layers * attn
        + (model.n_layers - n_moe) * 3 * d * model.ffn_dim
        + n_moe * moe_ffn
        + model.vocab_size * d
    )


def idle_expert_params(model: ModelConfig) -> int:
    """Parameters of the routed experts a token does not visit (0 for a dense model): the
    model's total minus this is its active parameter count."""
    expert = 3 * model.dim * resolved_moe_ffn_dim(model)
    return moe_layer_count(model) * (model.moe_experts - model.moe_top_k) * expert


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> float | None:
    """The device's peak TFLOP/s for `dtype`, `override` when set, None when unknown (CPUs)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key in name:
            return bf16 if dtype == "bfloat16" else fp32
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**30 if sys.platform == "darwin" else peak / 2**20
    )  # bytes on macOS, KiB on Linux


def memory_stats(device: torch.device) -> dict[str, float]:
    """`memory_gb` (peak: CUDA max allocated, or RSS on CPU) and, on CUDA, max reserved."""
    stats = {"memory_gb": memory_gb(device)}
    if device.type == "cuda":
        stats["memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return stats


class StepTimes:
    """Seconds spent per phase, summed over the steps of a logging window; read as means."""

    PHASES = ("time_data_s", "time_checkpoint_s")

    def __init__(self) -> None:
        self._sums = dict.fromkeys(self.PHASES, 0.0)
        self._steps = 0

    def add(self, phase: str, seconds: float) -> None:
        """Add `seconds` to `phase`; each `time_data_s` entry also counts one step."""
        self._sums[phase] += seconds
        self._steps += phase == "time_data_s"

    def read(self) -> dict[str, float]:
        """Mean seconds per step of each phase since the last read."""
        steps = max(self._steps, 1)
        means = {phase: total / steps for phase, total in self._sums.items()}
        self._sums, self._steps = dict.fromkeys(self.PHASES, 0.0), 0
        return means


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last `read()`."""

    def __init__(self, flops_per_token: float, num_devices: int, peak: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak = peak
        self._tokens = 0
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (evaluation, checkpointing) out of the training rate."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - begin

    def add(self, tokens: int) -> None:
        """Count tokens trained on by the whole job (each token once, however it is split)."""
        self._tokens += tokens

    def read(self) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.num_devices / 1e12
        self._tokens, self._start = 0, time.perf_counter()
        return {
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }


class MetricsLogger:
    """Rank 0's sinks: a tqdm progress bar (plain lines off a terminal), `<run_dir>/metrics.jsonl`,
    TensorBoard and W&B."""

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self._total_steps = total_steps
        self._bar = None
        self._plain = False
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if cfg.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        else:
            # Off a terminal (a Slurm log, tee, CI) every redraw of a bar would pile up as
            # carriage returns in one endless line: print a plain line per logged step instead.
            self._plain = cfg.progress
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, run_dir, run_config)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold `step`) to the JSONL file, TensorBoard and W&B."""
        if not self.enabled:
            return
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        step = int(record["step"])
        scalars = {k: v for k, v in clean.items() if isinstance(v, int | float) and k != "step"}
        scalars.update(_per_layer_scalars(clean))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def progress(
        self, step: int, loss: float | None, lr: float, tokens_per_s: float | None
    ) -> None:
        """Advance the progress bar to `step` with the latest figures (None: none logged yet);
        off a terminal, print them on one line every `metrics.log_every` steps and at the end."""
        if self._plain and (step % self.cfg.log_every == 0 or step == self._total_steps):
            print(_progress_line(step, self._total_steps, loss, lr, tokens_per_s), flush=True)
        if self._bar is None:
            return
        post = {"lr": f"{lr:.2e}"} if loss is None else {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, message: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()


def _progress_line(
    step: int, total: int, loss: float | None, lr: float, tokens_per_s: float | None
) -> str:
    """`step 10/200 | loss 4.1234 | lr 3.00e-03 | 12,345 tok/s`, leaving out what is unknown."""
    parts = [f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    parts.append(f"lr {lr:.2e}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    return " | ".join(parts)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):  # per-layer values (MoE)
        return [_finite_or_none(v) for v in value]
    return value


def _start_wandb(cfg: MetricsConfig, run_dir: Path, run_config: dict[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "metrics.wandb = true needs the wandb package: pip install 'distrib[wandb]'"
        ) from None
    wandb.init(
        project=cfg.wandb_project,
        name=cfg.wandb_run_name or run_dir.name,
        dir=str(run_dir),
        config=run_config,
    )
    return wandb


def _per_layer_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Per-MoE-layer lists as one scalar each (`moe_imbalance/layer3`) for TensorBoard and W&B,
    which take scalars only; `moe_layers` names the blocks the lists follow."""
    layers = record.get("moe_layers")
    if not isinstance(layers, list):
        return {}
    out: dict[str, float] = {}
    for key in ("moe_imbalance", "moe_aux_loss", "moe_z_loss"):
        values = record.get(key)
        if isinstance(values, list):
            for layer, value in zip(layers, values, strict=False):
                if isinstance(value, int | float):
                    out[f"{key}/layer{layer}"] = value
    return out
