"""The DeepSpeed engine: ZeRO stages 0-3 with optional CPU offload, behind the `Engine` interface.

`parallel.engine = "deepspeed"` builds the same model as the native engine (meta, activation
checkpointing, compile, then materialized with the same initial values), translates the distrib
config into a DeepSpeed config with the user's `parallel.deepspeed_config` JSON merged over it
(`distrib.deepspeed.config`), and hands model, AdamW and LR schedule to `deepspeed.initialize`.
Every rank is a data-parallel rank; ZeRO partitions optimizer state (1), gradients (2) and
parameters (3).

The loop's `accept` veto needs the global gradient norm, which DeepSpeed computes inside its
optimizer step, after the gradients are reduced and before they are applied. So the base optimizer's
`step` is gated (`_Gate`): the first time DeepSpeed calls it in a step, the gate asks `accept` with
DeepSpeed's own norm; a refusal turns every call of that step into a no-op, so parameters, moments
and step counters stay as they were, while DeepSpeed still advances the LR schedule.

Legend: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import types
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distrib.config import Config, ParallelConfig, TrainingConfig
from distrib.data.loader import Batch
from distrib.deepspeed.config import effective_config, offloads_optimizer, zero_stage
from distrib.engine import Accept, StepResult, forward_loss, timestamp
from distrib.errors import CheckpointError, ConfigError
from distrib.models.llama import Transformer
from distrib.optim import build_scheduler, param_groups
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.dims import ParallelDims
from distrib.parallel.init import clean_name, materialize
from distrib.runtime import Runtime

# DeepSpeed's checkpoint tag inside a step folder: one checkpoint per folder, so a fixed name.
TAG = "deepspeed"

# --- DeepSpeed's environment -----------------------------------------------------------------


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the accelerator matching `device`: on a machine without GPUs its
    CPU accelerator, whose communication backend is gloo (ccl only with oneCCL installed)."""
    if device.type == "cpu":
        # Before the first import: DeepSpeed picks its accelerator once, and otherwise warns
        # that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as err:
        raise ConfigError(
            "parallel.engine = 'deepspeed' needs DeepSpeed: pip install 'distrib[deepspeed]'"
        ) from err
    # DeepSpeed logs its whole configuration and every phase at INFO; distrib prints the
    # effective config itself, so keep DeepSpeed to warnings.
    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    name = get_accelerator().device_name()
    if name != device.type:
        raise ConfigError(
            f"DeepSpeed's accelerator is '{name}' but this process runs on {device}: "
            f"unset DS_ACCELERATOR (it is '{os.environ.get('DS_ACCELERATOR', '')}')"
        )
    return deepspeed


def init_distributed(deepspeed: Any, runtime: Runtime) -> None:
    """Make DeepSpeed use distrib's process group (gloo on CPU, nccl on GPU); one process gets a
    group of its own (DeepSpeed always needs one) held in memory, no port."""
    # DeepSpeed reads these from the environment in places (zero.Init: LOCAL_RANK); srun and
    # mpirun launches, and one process, do not set them.
    for key, value in (
        ("RANK", runtime.rank),
        ("LOCAL_RANK", runtime.launch.local_rank),
        ("WORLD_SIZE", runtime.world_size),
    ):
        os.environ.setdefault(key, str(value))
    if not dist.is_initialized():
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # With torch.distributed already up, DeepSpeed wraps the existing group.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


# --- the update gate ---------------------------------------------------------------------------


class _Gate:
    """Whether the base optimizer may apply an update: asked once per training step; closed
    outside one. DeepSpeed's fp16/bf16 ZeRO-0 wrappers step once with zero gradients when they
    are built, to create the optimizer state; that step would count in AdamW's bias correction
    and apply weight decay, which the native engine never does (the state appears lazily)."""

    def __init__(self) -> None:
        self.ask: Callable[[], bool] | None = None
        self.answer: bool | None = None

    def reset(self, ask: Callable[[], bool] | None) -> None:
        self.ask, self.answer = ask, None

    def open(self) -> bool:
        if self.ask is None:
            return False
        if self.answer is None:
            self.answer = self.ask()
        return self.answer


def _install_gate(optimizer: torch.optim.Optimizer, gate: _Gate) -> None:
    """Route `optimizer.step` through `gate`. An instance attribute, not a subclass: DeepSpeed
    checks `type(optimizer)` in places (DeepSpeedCPUAdam for offload). A bound method, as
    torch's LR schedulers wrap it in turn."""
    step = optimizer.step

    def gated_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        return step(*args, **kwargs) if gate.open() else None

    optimizer.step = types.MethodType(gated_step, optimizer)  # type: ignore[method-assign]


def build_optimizer(model: nn.Module, training: TrainingConfig, offload: bool) -> Any:
    """AdamW with the native engine's parameter groups (no decay on norms and biases): torch's
    on the device, DeepSpeedCPUAdam (a C++ op, built on first use) for optimizer offload, where
    DeepSpeed steps the CPU copy of the fp32 partitions."""
    groups = param_groups(model, training.weight_decay)
    hyper = {"lr": training.lr, "betas": (training.beta1, training.beta2), "eps": training.eps}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])  # type: ignore[attr-defined]
    return torch.optim.AdamW(
        groups, fused=True if on_cuda else None, foreach=None if on_cuda else True, **hyper
    )


# --- the engine --------------------------------------------------------------------------------


class DeepSpeedEngine:
    """Training through a `deepspeed.DeepSpeedEngine`; the `Engine` protocol of distrib.engine."""

    def __init__(
        self,
        ds: Any,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        gate: _Gate,
        device: torch.device,
        rank: int,
        training: TrainingConfig,
    ) -> None:
        self.ds = ds
        self.training = training  # for the loss: chunking and compile
        self.model: nn.Module = ds.module
        self.scheduler = scheduler
        self.gate = gate
        self.device = device
        self.rank = rank
        # Without a wrapper (ZeRO-0 in float32) the optimizer is our AdamW and DeepSpeed never
        # computes the norm for us: then we take it from the reduced gradients before the step.
        self._own_norm = not hasattr(ds.optimizer, "_global_grad_norm")
        self._warned_background = False

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        return forward_loss(
            self.ds,
            batch,
            self.device,
            loss_chunk_tokens=self.training.loss_chunk_tokens,
            compiled=self.training.compile,
        )

    def _now(self, timed: bool) -> float:
        return timestamp(self.device, timed)

    def train_step(
        self,
        batches: list[Batch],
        timed: bool = False,
        accept: Accept | None = None,
        poison: bool = False,
    ) -> StepResult:
        """Forward and backward each micro-batch (DeepSpeed scales by 1/accumulation and reduces
        at the boundary), then DeepSpeed's step: norm, clip, update, LR schedule. `accept` sees
        the global loss and DeepSpeed's global norm before any parameter changes."""
        gas = self.ds.gradient_accumulation_steps()
        if len(batches) != gas:
            raise ValueError(f"expected {gas} micro-batches per step, got {len(batches)}")
        self.ds.train()
        start = self._now(timed)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            loss = self._forward_loss(batch)
            if poison:  # a NaN factor poisons both the loss and every gradient it reaches
                loss = loss * float("nan")
            self.ds.backward(loss)
            total += loss.detach().float()
            if i < len(batches) - 1:
                self.ds.step()  # only counts the micro-step: DeepSpeed updates at the boundary
        computed = self._now(timed)
        local = total / len(batches)
        mean = _mean_over_ranks(local)
        norm = self._module_grad_norm() if self._own_norm else None
        seen: dict[str, torch.Tensor] = {}

        def ask() -> bool:
            seen["norm"] = norm if norm is not None else self._deepspeed_norm()
            return accept is None or accept(mean, seen["norm"])

        self.gate.reset(ask)
        self.ds.step()
        applied = self.gate.answer
        if applied is None:
            # DeepSpeed skipped the update itself (a non-finite norm) and with it the schedule:
            # ask anyway, so the guard records why, and keep the schedule on time.
            ask()
            applied = False
            self.scheduler.step()
        self.gate.reset(None)
        updated = self._now(timed)
        timings = None
        if timed:
            timings = {
                "time_forward_backward_s": computed - start,
                "time_optimizer_s": updated - computed,
            }
        return StepResult(
            loss=mean,
            grad_norm=seen["norm"],
            timings=timings,
            skipped=not applied,
            local_loss=local,
        )

    def _deepspeed_norm(self) -> torch.Tensor:
        """The global gradient norm before clipping, as DeepSpeed's optimizer computed it."""
        norm = self.ds.optimizer._global_grad_norm  # noqa: SLF001 - set before the base step
        if norm is None:
            return torch.tensor(math.nan, device=self.device)
        return torch.as_tensor(norm, device=self.device).detach().float().reshape(())

    def _module_grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True).detach().float()

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches`, the same number on every rank."""
        self.ds.eval()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            total += self._forward_loss(batch).float()
        return _mean_over_ranks(total / len(batches))

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(
        self,
        folder: Path,
        extra: dict[str, Any],
        background: bool,
        process_group: dist.ProcessGroup | None = None,
        stager: Any = None,
    ) -> Future[Any] | None:
        """DeepSpeed's own checkpoint (each rank its partitions) in `folder/deepspeed`, and
        beside it each rank's `extra` (loader, step, skipped steps, its RNG) in
        `distrib_rank<R>.pt`. Always synchronous: DeepSpeed has no background save that reports
        completion, so `background` is honoured by saving now (`process_group` and `stager`,
        DCP's, are unused)."""
        if background and not self._warned_background and self.rank == 0:
            warnings.warn(
                "checkpoint.async_save: the DeepSpeed engine saves synchronously",
                stacklevel=2,
            )
            self._warned_background = True
        self.ds.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)
        torch.save(_extra_state(extra), folder / f"distrib_rank{self.rank}.pt")
        return None

    def load(self, folder: Path, extra: dict[str, Any]) -> None:
        """Restore DeepSpeed's state (model, optimizer, LR schedule) and `extra` in place."""
        mine = folder / f"distrib_rank{self.rank}.pt"
        if not (folder / TAG).is_dir() or not mine.is_file():
            raise CheckpointError(
                f"{folder} is not a DeepSpeed checkpoint of this run's size: it needs "
                f"{TAG}/ and {mine.name} (saved by parallel.engine = 'deepspeed' on as many ranks)"
            )
        path, _ = self.ds.load_checkpoint(
            str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {folder / TAG}")
        # weights_only: unpickling may not run code; the RNG entries hold NumPy's state.
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            saved = torch.load(mine, map_location="cpu", weights_only=True)
        _restore_extra(saved, extra, mine)


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    return summed / dist.get_world_size()


def _extra_state(extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` with Stateful values (the loader) replaced by their state dicts."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in extra.items()}


def _numpy_rng_globals() -> list[Any]:
    """What a pickled `np.random.get_state()` needs to load under `weights_only=True`."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # NumPy 1
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _restore_extra(saved: Mapping[str, Any], extra: dict[str, Any], source: Path) -> None:
    for key, value in extra.items():
        if key not in saved:
            if key.startswith("rng_rank"):
                continue  # a rank the saving run did not have keeps its fresh generators
            raise CheckpointError(f"{source} has no '{key}'; it holds {sorted(saved)}")
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(saved[key])
        else:
            extra[key] = saved[key]


# --- building it -------------------------------------------------------------------------------


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The whole model as the native engine starts it: on meta, activation checkpointing and
    compile applied, then materialized on `device` with the seed's initial values."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_ac(model, cfg.parallel.activation_checkpoint, cfg.parallel.activation_memory_budget)
    if cfg.training.compile:
        apply_compile(model)
    materialize(model, device, cfg.training.seed)
    if cfg.model.init_from:
        from distrib.models.hf import load_hf_weights

        load_hf_weights([model], cfg.model.init_from.removeprefix("hf:"), cfg.model)
    return model


def _dp_size(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree: ZeRO shards over the `dp_shard` axis, which must span every
    process (-1 or the world size; config validation keeps tp, pp and dp_replicate at 1)."""
    return ParallelDims.from_config(parallel, world_size).dp


def build_deepspeed_engine(cfg: Config, runtime: Runtime) -> tuple[DeepSpeedEngine, int, int]:
    """Build the model, the DeepSpeed config, optimizer and schedule, and `deepspeed.initialize`
    them. Returns the engine and this rank's (data-parallel rank, data-parallel size)."""
    deepspeed = import_deepspeed(runtime.device)
    init_distributed(deepspeed, runtime)
    dp_size = _dp_size(cfg.parallel, dist.get_world_size())
    config = effective_config(cfg, dp_size, runtime.device.type)
    if runtime.is_main:
        print(f"deepspeed config: {json.dumps(config, sort_keys=True)}", flush=True)
    stage3 = zero_stage(config) == 3
    # ZeRO-3 partitions from a host copy one parameter at a time (zero.Init below), so the
    # whole model never has to fit on one accelerator.
    model = build_model(cfg, torch.device("cpu") if stage3 else runtime.device)
    gate = _Gate()
    # Before partitioning: the parameter groups tell matrices from vectors by their shape, which
    # a partitioned parameter no longer has (the same Parameter objects stay in the groups).
    optimizer = build_optimizer(model, cfg.training, offloads_optimizer(config))
    _install_gate(optimizer, gate)
    scheduler = build_scheduler(optimizer, cfg.training)
    if stage3:
        deepspeed.zero.Init(module=model, config_dict_or_path=config)
    ds, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    engine = DeepSpeedEngine(
        ds, scheduler, gate, runtime.device, dist.get_rank(), training=cfg.training
    )
    return engine, dist.get_rank(), dp_size


def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model's float32 weights from the DeepSpeed checkpoint in the step folder
    `folder` (any ZeRO stage), keyed as the bare model names them. One process, no engine: for
    generation and export."""
    # Imported for its side effect: DeepSpeed picks its accelerator on first import.
    import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tag_dir = folder / TAG
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
    else:  # ZeRO-0: rank 0 saved the whole module
        saved = torch.load(
            tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )
        state = saved["module"]
    return {clean_name(k): v.float() for k, v in state.items()}
