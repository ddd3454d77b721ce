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
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from distrib.checkpoint import ModelState, OptimizerState
from distrib.config import TrainingConfig
from distrib.data.loader import Batch
from distrib.optim import build_optimizer, build_scheduler


@dataclass
class StepResult:
    """Mean loss over the step's micro-batches and the global gradient norm before clipping.

    Both stay tensors on the device: reading them (`.item()`) synchronizes, so the loop does it
    only when it logs.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor


class Engine(Protocol):
    model: nn.Module

    def train_step(self, batches: list[Batch]) -> StepResult: ...

    def eval_loss(self, batches: list[Batch]) -> torch.Tensor: ...

    def lr(self) -> float: ...

    def state(self) -> dict[str, Any]: ...


def causal_lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in float32 whatever the compute dtype."""
    return F.cross_entropy(logits_BLV.float().flatten(0, 1), labels_BL.flatten())


class NativeEngine:
    """One full model replica per process, trained with plain PyTorch."""

    def __init__(self, model: nn.Module, cfg: TrainingConfig, device: torch.device) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        inputs = batch.inputs.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        doc_ids = (
            None if batch.doc_ids is None else batch.doc_ids.to(self.device, non_blocking=True)
        )
        with self._autocast():
            logits_BLV = self.model(inputs, doc_ids)
        return causal_lm_loss(logits_BLV, labels)

    def train_step(self, batches: list[Batch]) -> StepResult:
        """Accumulate gradients over `batches`, clip, update and advance the LR schedule."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            # Every micro-batch holds the same number of tokens, so the mean of the micro-batch
            # means is the step's mean; scaling each backward by 1/n accumulates exactly that.
            loss = self._forward_loss(batch)
            (loss / len(batches)).backward()
            total += loss.detach()
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss=total / len(batches), grad_norm=grad_norm.detach())

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> torch.Tensor:
        """Mean loss over `batches` without touching gradients or the optimizer."""
        self.model.eval()
        losses = [self._forward_loss(batch) for batch in batches]
        return torch.stack(losses).mean()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state(self) -> dict[str, Any]:
        """Checkpointable parts, as DCP `Stateful` objects."""
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
        }
