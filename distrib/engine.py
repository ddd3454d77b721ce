"""The training engine: the one interface the training loop talks to.

An engine owns the model, optimizer and LR schedule; it runs a step over this rank's
micro-batches (forward, backward with accumulation, clipping, update), evaluates, and names the
state to checkpoint. `NativeEngine` is plain PyTorch on one model replica; the parallel layouts
(FSDP2 / DDP / TP / PP) and DeepSpeed implement the same methods, so the loop has no branch on
which engine runs.

Legend: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrib import checkpoint as ckpt
from distrib.checkpoint import ModelState, OptimizerState, SchedulerState
from distrib.config import TrainingConfig
from distrib.data.loader import Batch

# causal_lm_loss lives in distrib.loss; `from distrib.engine import causal_lm_loss` still works.
from distrib.loss import causal_lm_loss, compiled_causal_lm_loss
from distrib.optim import build_optimizer, build_scheduler
from distrib.parallel.fsdp import set_gradient_sync


@dataclass
class StepResult:
    """Mean loss over the step's micro-batches and the global gradient norm before clipping.

    Both stay tensors on the device: reading them (`.item()`) synchronizes, so the loop does it
    only when it logs.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    timings: dict[str, float] | None = None  # seconds per phase, on steps asked to be timed
    skipped: bool = False  # the update was not applied (`accept` refused it)
    local_loss: torch.Tensor | None = None  # this rank's own mean loss, to name failing ranks


# Decides, from the step's global loss and gradient norm (the same on every rank), whether the
# update is applied; refusing drops the gradients on every rank alike.
Accept = Callable[[torch.Tensor, torch.Tensor], bool]


class Engine(Protocol):
    """What the training loop needs from an engine; `NativeEngine` and `DeepSpeedEngine`."""

    model: nn.Module

    def train_step(
        self,
        batches: list[Batch],
        timed: bool = False,
        accept: Accept | None = None,
        poison: bool = False,
    ) -> StepResult:
        """Forward, backward (accumulating over `batches`), clip and update; `accept` may veto
        the update; `poison` makes this rank's loss NaN (debug.nan_at_step)."""
        ...

    def eval_loss(self, batches: list[Batch]) -> torch.Tensor: ...

    def lr(self) -> float: ...

    def save(
        self,
        folder: Path,
        extra: dict[str, Any],
        background: bool,
        process_group: dist.ProcessGroup | None = None,
        stager: Any = None,
    ) -> Future[Any] | None:
        """Write the engine's state and `extra` (loader, step, RNG) into `folder`; every rank
        calls it. In the background it returns a future that completes once written, using
        `process_group` for its collectives and `stager` (DCP's) for the copy it writes from."""
        ...

    def load(self, folder: Path, extra: dict[str, Any]) -> None:
        """Restore the engine's state and `extra` in place from `folder`."""
        ...


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor: under loss parallelism it is a replicated DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def forward_loss(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    loss_chunk_tokens: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """The mean next-token loss of `model` on one micro-batch moved to `device`.

    With `loss_chunk_tokens > 0` the model computes the loss itself, its output head and
    cross-entropy in chunks (see `Transformer.forward`); otherwise it returns logits and the
    loss is taken here, by the compiled loss when `compiled`.
    """
    inputs = batch.inputs.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    doc_ids = None if batch.doc_ids is None else batch.doc_ids.to(device, non_blocking=True)
    if loss_chunk_tokens > 0:
        return model(inputs, doc_ids, labels_BL=labels, loss_chunk_tokens=loss_chunk_tokens)
    logits_BLV = model(inputs, doc_ids)
    # Vocab-sharded logits (a DTensor under loss parallelism) take the eager loss, whose
    # DTensor handlers the loss_parallel context installs.
    if compiled and not isinstance(logits_BLV, DTensor):
        return compiled_causal_lm_loss()(logits_BLV, labels)
    return causal_lm_loss(logits_BLV, labels)


def timestamp(device: torch.device, timed: bool) -> float:
    """perf_counter; on a timed step, after the device has caught up, so that the split of a
    step into phases is real on GPUs. Untimed steps never synchronize."""
    if timed and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class NativeEngine:
    """PyTorch-native training of this rank's model parts under any layout on one mesh.

    `parts` is the whole (possibly FSDP/DDP/TP-wrapped) model, or this rank's pipeline stages
    when `pipeline` is given. Without a process group (one process) it is plain PyTorch.
    """

    def __init__(
        self,
        parts: list[nn.Module],
        cfg: TrainingConfig,
        device: torch.device,
        pipeline: Any = None,
        loss_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        autocast: bool = True,
        pp_group: dist.ProcessGroup | None = None,
        num_loss_ranks: int = 1,
    ) -> None:
        self.parts = parts
        self.model = parts[0]
        self.cfg = cfg
        self.device = device
        self.pipeline = pipeline
        self.loss_context = loss_context
        # FSDP's mixed-precision policy casts parameters itself; autocast is for the rest.
        self.use_autocast = autocast and cfg.dtype == "bfloat16"
        self.pp_group = pp_group
        self.num_loss_ranks = num_loss_ranks  # ranks holding the loss: dp x tp of the last stage
        self.optimizers = [build_optimizer(part, cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg) for opt in self.optimizers]
        self._params = [p for part in parts for p in part.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            return forward_loss(
                self.model,
                batch,
                self.device,
                loss_chunk_tokens=self.cfg.loss_chunk_tokens,
                compiled=self.cfg.compile,
            )

    def _micro_step(self, batch: Batch, scale: float, poison: bool) -> torch.Tensor | None:
        """Forward and backward of one micro-batch; its mean loss where this rank has it."""
        if poison:  # a NaN factor poisons both the loss and every gradient it reaches
            scale = scale * float("nan")
        if self.pipeline is not None:
            p = self.pipeline
            inputs = batch.inputs.to(self.device) if p.has_first else None
            labels = batch.labels.to(self.device) if p.has_last else None
            with self._autocast():
                loss = p.step(inputs, labels, loss_scale=scale)
            return loss * float("nan") if poison and loss is not None else loss
        with self.loss_context():
            # Every micro-batch holds the same number of tokens, so scaling each backward by
            # 1/n accumulates the gradient of the step's mean loss.
            loss = self._forward_loss(batch)
            (loss * scale).backward()
        loss = _plain(loss.detach())
        return loss * float("nan") if poison else loss

    def _now(self, timed: bool) -> float:
        return timestamp(self.device, timed)

    def train_step(
        self,
        batches: list[Batch],
        timed: bool = False,
        accept: Accept | None = None,
        poison: bool = False,
    ) -> StepResult:
        """Accumulate gradients over `batches`, clip, update and advance the LR schedule;
        `timed` measures forward+backward and optimizer time. When `accept` refuses the step's
        loss and gradient norm, the gradients are dropped and the schedule still advances."""
        for part in self.parts:
            part.train()
        start = self._now(timed)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # Reduce gradients across data-parallel ranks once, after the last micro-batch.
            set_gradient_sync(self.parts, i == len(batches) - 1)
            loss = self._micro_step(batch, 1.0 / len(batches), poison)
            if loss is not None:
                total += loss.float()
        computed = self._now(timed)
        grad_norm = self._clip_grad_norm()
        local = total / len(batches)
        mean = self._mean_over_loss_ranks(local)
        apply = accept is None or accept(mean, grad_norm)
        for opt, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            if apply:
                opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler.step()
        updated = self._now(timed)
        timings = None
        if timed:
            timings = {
                "time_forward_backward_s": computed - start,
                "time_optimizer_s": updated - computed,
            }
        return StepResult(
            loss=mean, grad_norm=grad_norm, timings=timings, skipped=not apply, local_loss=local
        )

    def _clip_grad_norm(self) -> torch.Tensor:
        """The norm of all gradients of the whole model, wherever its pieces live, then clip."""
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):  # sharded (FSDP/TP) gradients: finish the reduction
            norm = norm.full_tensor()
        if self.pp_group is not None:  # each stage holds different parameters: add squares
            squared = norm**2
            dist.all_reduce(squared, group=self.pp_group)
            norm = squared.sqrt()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                self._params, self.cfg.max_grad_norm, norm, foreach=True
            )
        return norm.detach()

    def _mean_over_loss_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss as one number on every rank: the mean over data-parallel ranks of
        the last stage's loss (TP peers hold equal copies; other stages contribute zero)."""
        if not (dist.is_available() and dist.is_initialized()):
            return loss
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        return summed / self.num_loss_ranks

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches` without touching gradients or the optimizer."""
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            if self.pipeline is not None:
                p = self.pipeline
                inputs = batch.inputs.to(self.device) if p.has_first else None
                labels = batch.labels.to(self.device) if p.has_last else None
                with self._autocast():
                    loss = p.eval_step(inputs, labels)
            else:
                with self.loss_context():
                    loss = _plain(self._forward_loss(batch))
            if loss is not None:
                total += loss.float()
        return self._mean_over_loss_ranks(total / len(batches))

    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def state(self) -> dict[str, Any]:
        """Checkpointable parts, as DCP `Stateful` objects."""
        return {
            "model": ModelState(self.parts),
            "optimizer": OptimizerState(self.parts, self.optimizers),
            "scheduler": SchedulerState(self.schedulers),
        }

    def save(
        self,
        folder: Path,
        extra: dict[str, Any],
        background: bool,
        process_group: dist.ProcessGroup | None = None,
        stager: Any = None,
    ) -> Future[Any] | None:
        """DCP: each rank writes its own shards; any layout can load them back."""
        write = ckpt.dcp_writer({**self.state(), **extra}, process_group, stager)
        return write(folder, background)

    def load(self, folder: Path, extra: dict[str, Any]) -> None:
        state = {**self.state(), **extra}
        ckpt.load(folder, state)
        extra.update({k: state[k] for k in extra})
