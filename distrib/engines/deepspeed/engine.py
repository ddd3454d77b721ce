"""The DeepSpeed engine: ZeRO stages 0-3 with optional CPU offload, behind the `Engine` interface.

`parallel.engine = "deepspeed"` builds the same model as the native engine (`build.py`), with
the user's `parallel.deepspeed_config` JSON merged over the translated config (`config.py`).
Every rank is a data-parallel rank; ZeRO partitions optimizer state (1), gradients (2) and
parameters (3). The training loop's veto on an update goes through `gate.py`.

Legend: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distrib.checkpoint.deepspeed import DeepSpeedState
from distrib.config import TrainingConfig
from distrib.data.loader import Batch
from distrib.engines.base import Accept, StepEngine, mean_over_ranks
from distrib.engines.deepspeed.gate import UpdateGate
from distrib.engines.objectives import DPOObjective, Objective, TokenObjective
from distrib.models.moe import set_aux_loss_scale


class DeepSpeedEngine(StepEngine):
    """Training through a `deepspeed.DeepSpeedEngine`; the `Engine` protocol of distrib.engines.native."""

    def __init__(
        self,
        ds: Any,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        gate: UpdateGate,
        device: torch.device,
        rank: int,
        training: TrainingConfig,
        objective: Objective | None = None,
    ) -> None:
        self.ds = ds
        self.objective = objective or TokenObjective(training)
        self.training = training  # for the loss: chunking and compile
        self.model: nn.Module = ds.module
        self.scheduler = scheduler
        self.gate = gate
        self.device = device
        self.rank = rank
        # Without a wrapper (ZeRO-0 in float32) the optimizer is our AdamW and DeepSpeed never
        # computes the norm for us: then we take it from the reduced gradients before the step.
        self._own_norm = not hasattr(ds.optimizer, "_global_grad_norm")

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        return self.objective.loss(self.ds, batch, self.device)

    @torch.no_grad()
    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """See `Engine.sequence_logps`."""
        self.ds.eval()
        return DPOObjective.sequence_logps(self.ds, batch, self.device)

    def _accumulate(self, batches: list[Batch]) -> torch.Tensor:
        # DeepSpeed scales each backward by 1/accumulation and reduces at the boundary.
        gas = self.ds.gradient_accumulation_steps()
        if len(batches) != gas:
            raise ValueError(f"expected {gas} micro-batches per step, got {len(batches)}")
        self.ds.train()
        set_aux_loss_scale([self.model], 1.0 / gas)  # MoE auxiliary losses, scaled as the loss
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            loss = self._forward_loss(batch)
            self.ds.backward(loss)
            total += loss.detach().float()
            if i < len(batches) - 1:
                self.ds.step()  # only counts the micro-step: DeepSpeed updates at the boundary
        return total

    def _update(self, mean: torch.Tensor, accept: Accept | None) -> tuple[torch.Tensor, bool]:
        # DeepSpeed's step: norm, clip, update, LR schedule; the gate asks `accept` with
        # DeepSpeed's global norm before any parameter changes.
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
        return seen["norm"], applied

    def _loss_ranks(self) -> int:
        return dist.get_world_size()

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
        return mean_over_ranks(total / len(batches), dist.get_world_size())

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def checkpoint_state(self) -> dict[str, Any]:
        """DeepSpeed's whole state (each rank its partitions), which DeepSpeed writes itself."""
        return {"deepspeed": DeepSpeedState(self.ds)}
