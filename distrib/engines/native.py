"""The native engine: plain PyTorch on this rank's model parts, under any layout on one mesh
(FSDP2 / DDP / TP / PP / CP / EP), behind the `Engine` interface of `distrib.engines.base`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrib.checkpoint.state import ModelState, OptimizerState, SchedulerState
from distrib.config import TrainingConfig
from distrib.data.loader import Batch
from distrib.engines.base import Accept, StepEngine, mean_over_ranks, plain
from distrib.engines.objectives import Objective, TokenObjective
from distrib.engines.optim import build_optimizer, build_scheduler
from distrib.models.moe import set_aux_loss_scale
from distrib.parallel.context import ContextParallel
from distrib.parallel.fsdp import set_gradient_sync
from distrib.parallel.replicas import load_local_state


class NativeEngine(StepEngine):
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
        objective: Objective | None = None,
        context: ContextParallel | None = None,
    ) -> None:
        self.parts = parts
        self.objective = objective or TokenObjective(cfg)
        self.model = parts[0]
        self.cfg = cfg
        self.device = device
        self.pipeline = pipeline
        self.loss_context = loss_context
        # FSDP's mixed-precision policy casts parameters itself; autocast is for the rest.
        self.use_autocast = autocast and cfg.dtype == "bfloat16"
        self.pp_group = pp_group
        self.num_loss_ranks = num_loss_ranks  # ranks holding the loss: dp x cp x tp, last stage
        self.context = context  # context parallelism: each rank trains on a share of the tokens
        self.optimizers = [build_optimizer(part, cfg) for part in parts]
        self.schedulers = [build_scheduler(opt, cfg) for opt in self.optimizers]
        self._params = [p for part in parts for p in part.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            return self.objective.loss(self.model, batch, self.device)

    @torch.no_grad()
    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """See `Engine.sequence_logps` (data-parallel layouts: the whole model on this rank)."""
        from distrib.engines.objectives import DPOObjective

        self.model.eval()
        with self._autocast():
            return DPOObjective.sequence_logps(self.model, batch, self.device)

    def _sequence_share(self, batch: Batch) -> tuple[Batch, contextlib.AbstractContextManager[Any]]:
        """This rank's share of `batch` under context parallelism, and the context that gives
        the model the RoPE positions of that share; the batch as it is otherwise."""
        if self.context is None:
            return batch, contextlib.nullcontext()
        share = self.context.shard(batch)
        return share, self.context.positions(self.parts, share.inputs.shape[1])

    def _micro_step(self, batch: Batch, scale: float) -> torch.Tensor | None:
        """Forward and backward of one micro-batch; its mean loss where this rank has it."""
        batch, positions = self._sequence_share(batch)
        with positions:
            return self._micro_step_of(batch, scale)

    def _micro_step_of(self, batch: Batch, scale: float) -> torch.Tensor | None:
        if self.pipeline is not None:
            p = self.pipeline
            set_aux_loss_scale(self.parts, scale / p.n_microbatches)  # as the pipeline's loss
            inputs = batch.inputs.to(self.device, non_blocking=True) if p.has_first else None
            labels = batch.labels.to(self.device, non_blocking=True) if p.has_last else None
            with self._autocast():
                loss = p.step(inputs, labels, loss_scale=scale, denominator=batch.loss_denominator)
            return loss
        set_aux_loss_scale(self.parts, scale)
        with self.loss_context():
            # Every micro-batch holds the same number of tokens (or divides its sum by the
            # step's mean count, `Batch.loss_denominator`), so scaling each backward by 1/n
            # accumulates the gradient of the step's mean loss.
            loss = self._forward_loss(batch)
            (loss * scale).backward()
        loss = plain(loss.detach())
        return loss

    def _accumulate(self, batches: list[Batch]) -> torch.Tensor:
        for part in self.parts:
            part.train()
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            # Reduce gradients across data-parallel ranks once, after the last micro-batch.
            set_gradient_sync(self.parts, i == len(batches) - 1)
            loss = self._micro_step(batch, 1.0 / len(batches))
            if loss is not None:
                total += loss.float()
        return total

    def _update(self, mean: torch.Tensor, accept: Accept | None) -> tuple[torch.Tensor, bool]:
        # A refused update drops the gradients; the schedule still advances.
        if self.replicas is not None:  # fault tolerance: average over the replica groups first
            self.replicas.average_gradients(self._params)
        grad_norm = self._clip_grad_norm()
        apply = accept is None or accept(mean, grad_norm)
        self._committed = self.replicas is None or self.replicas.commit()
        if not self._committed:  # a group failed mid-step: nothing moves, not even the schedule
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return grad_norm, False
        for opt, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            if apply:
                opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler.step()
        return grad_norm, apply

    def _loss_ranks(self) -> int:
        return self.num_loss_ranks

    def _clip_grad_norm(self) -> torch.Tensor:
        """The norm of all gradients of the whole model, wherever its pieces live, then clip."""
        groups = _by_mesh([p for p in self._params if p.grad is not None])
        squared = torch.zeros((), device=self.device)
        for params in groups:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if isinstance(norm, DTensor):  # sharded (FSDP/TP/EP) gradients: finish the reduction
                norm = norm.full_tensor()
            squared = squared + norm.float() ** 2
        if self.pp_group is not None:  # each stage holds different parameters: add squares
            dist.all_reduce(squared, group=self.pp_group)
        norm = squared.sqrt()
        if self.cfg.max_grad_norm > 0:
            for params in groups:
                torch.nn.utils.clip_grads_with_norm_(
                    params, self.cfg.max_grad_norm, norm, foreach=True
                )
        return norm.detach()

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches` without touching gradients or the optimizer."""
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        for whole in batches:
            batch, positions = self._sequence_share(whole)
            if self.pipeline is not None:
                p = self.pipeline
                inputs = batch.inputs.to(self.device) if p.has_first else None
                labels = batch.labels.to(self.device) if p.has_last else None
                with self._autocast(), positions:
                    loss = p.eval_step(inputs, labels, batch.loss_denominator)
            else:
                with self.loss_context(), positions:
                    loss = plain(self._forward_loss(batch))
            if loss is not None:
                total += loss.float()
        return mean_over_ranks(total / len(batches), self.num_loss_ranks)

    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def checkpoint_state(self) -> dict[str, Any]:
        """Weights, optimizer moments and LR schedule as DCP `Stateful` objects: each rank
        writes its own shards, and any layout can load them back."""
        state: dict[str, Any] = {
            # Frozen parameters (a LoRA run's base) are rebuilt from model.init_from: not saved.
            "model": ModelState(self.parts, trainable_only=self._has_frozen()),
            "optimizer": OptimizerState(self.parts, self.optimizers),
            "scheduler": SchedulerState(self.schedulers),
        }
        if self.replicas is not None and self.replicas.outer is not None:
            state["outer_optimizer"] = OptimizerState(self.parts, self.replicas.outer)  # DiLoCo
        return state

    def replica_state(self) -> dict[str, Any]:
        """See `Engine.replica_state`."""
        return {
            "model": [part.state_dict() for part in self.parts],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
        }

    def load_replica_state(self, state: dict[str, Any]) -> None:
        """See `Engine.load_replica_state`."""
        load_local_state(self.parts, self.optimizers, state)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)

    def _has_frozen(self) -> bool:
        return any(not p.requires_grad for part in self.parts for p in part.parameters())


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters grouped by the mesh their DTensor lives on (plain tensors together).

    Gradient norms and clipping run per group: with expert parallelism the experts live on
    another mesh than the dense weights, and one foreach kernel cannot mix DTensors of two
    meshes.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault(key, []).append(p)
    return list(groups.values())
