"""The training engine: the one interface the training loop talks to, and what engines share.

An engine owns the model, optimizer and LR schedule; it runs a step over this rank's
micro-batches (forward, backward with accumulation, clipping, update), evaluates, and hands the
checkpointer its state as `Stateful` objects. `NativeEngine` (FSDP2 / DDP / TP / PP on one mesh)
and `DeepSpeedEngine` implement the same methods, so the loop has no branch on which engine
runs. Both use `StepTimer`, `mean_over_ranks` and the step of `StepEngine` from here; what a
micro-batch's loss is comes from `distrib.engines.objectives`.

Legend: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrib.data.loader import Batch
from distrib.engines.objectives import Objective
from distrib.parallel.expert import ExpertBalance
from distrib.parallel.replicas import ReplicaGroups


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
    metrics: dict[str, torch.Tensor] | None = None  # the objective's figures (DPO rewards)
    # False when fault-tolerant replica groups did not all finish the step: nothing was
    # applied, the schedule did not move, and the step is redone with the next batch.
    committed: bool = True


# Decides, from the step's global loss and gradient norm (the same on every rank), whether the
# update is applied; refusing drops the gradients on every rank alike.
Accept = Callable[[torch.Tensor, torch.Tensor], bool]


class Engine(Protocol):
    """What the training loop needs from an engine; `NativeEngine` and `DeepSpeedEngine`."""

    model: nn.Module
    replicas: ReplicaGroups | None  # this job's replica group under fault tolerance

    def train_step(
        self,
        batches: list[Batch],
        timed: bool = False,
        accept: Accept | None = None,
    ) -> StepResult:
        """Forward, backward (accumulating over `batches`), clip and update; `accept` may veto
        the update."""
        ...

    def eval_loss(self, batches: list[Batch]) -> torch.Tensor: ...

    def lr(self) -> float: ...

    def checkpoint_state(self) -> dict[str, Any]:
        """The engine's part of a checkpoint, as `Stateful` objects (or one object that writes
        its own files, `distrib.checkpoint.state.OwnFormat`), keyed by name."""
        ...

    def replica_state(self) -> dict[str, Any]:
        """This rank's model, optimizer and schedule as a healing replica group receives
        them (fault tolerance; the native engine only)."""
        ...

    def load_replica_state(self, state: dict[str, Any]) -> None:
        """Take a peer replica group's `replica_state` as this rank's own."""
        ...

    def expert_metrics(self) -> dict[str, Any]:
        """Per-MoE-layer load imbalance and auxiliary losses since the last call (empty for a
        dense model). A collective: every rank calls it at the same step."""
        ...

    def objective_metrics(self) -> dict[str, torch.Tensor]:
        """The objective's figures since the last call (DPO rewards), means over all ranks.
        A collective: every rank calls it at the same point."""
        ...

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """Per row of `batch`, the summed log-probabilities of its counted labels under the
        current model, without gradients (the DPO reference pass)."""
        ...


def plain(t: torch.Tensor) -> torch.Tensor:
    """A loss as a plain tensor: under loss parallelism it is a replicated DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class StepTimer:
    """The split of one training step into forward+backward and optimizer time. On a timed
    step each mark waits for the device, so the split is real on GPUs; untimed steps never
    synchronize and report nothing."""

    def __init__(self, device: torch.device, timed: bool) -> None:
        self.device = device
        self.timed = timed
        self.marks = [self._now()]

    def _now(self) -> float:
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self) -> None:
        """The end of a phase: computed (after the last backward), then updated."""
        if self.timed:
            self.marks.append(self._now())

    def timings(self) -> dict[str, float] | None:
        if not self.timed:
            return None
        start, computed, updated = self.marks
        return {"time_forward_backward_s": computed - start, "time_optimizer_s": updated - computed}


class StepEngine:
    """The step both engines share: accumulate this rank's micro-batches, average the loss over
    the ranks that hold one, let the engine update (or not, as `accept` says), time the phases.
    An engine provides `_accumulate`, `_update` and `_loss_ranks`."""

    device: torch.device
    objective: Objective
    experts: ExpertBalance | None = None  # set where the model has MoE layers
    replicas: ReplicaGroups | None = None  # set under fault tolerance (native engine)
    _committed = True  # whether the last update was committed by every replica group

    def _accumulate(self, batches: list[Batch]) -> torch.Tensor:
        """Forward and backward every micro-batch; the sum of this rank's losses (zero where
        this rank holds no loss, as earlier pipeline stages)."""
        raise NotImplementedError

    def _update(self, mean: torch.Tensor, accept: Accept | None) -> tuple[torch.Tensor, bool]:
        """Clip and update unless `accept` refuses; the global gradient norm before clipping,
        and whether the update was applied. The LR schedule advances either way."""
        raise NotImplementedError

    def _loss_ranks(self) -> int:
        """How many ranks hold a loss (the divisor of the cross-rank mean)."""
        raise NotImplementedError

    def train_step(
        self, batches: list[Batch], timed: bool = False, accept: Accept | None = None
    ) -> StepResult:
        """Forward, backward (accumulating over `batches`), clip and update; `accept` sees the
        step's global loss and gradient norm and may veto the update on every rank alike;
        `timed` splits the step into forward+backward and optimizer time."""
        timer = StepTimer(self.device, timed)
        local = self._accumulate(batches) / len(batches)
        timer.mark()
        mean = mean_over_ranks(local, self._loss_ranks())
        grad_norm, applied = self._update(mean, accept)
        if self.experts is not None:
            self.experts.after_step(applied)
        timer.mark()
        return StepResult(
            loss=mean,
            grad_norm=grad_norm,
            timings=timer.timings(),
            skipped=not applied and self._committed,
            committed=self._committed,
            local_loss=local,
            metrics=self.objective_metrics(),
        )

    def expert_metrics(self) -> dict[str, Any]:
        """See `Engine.expert_metrics`."""
        return self.experts.metrics() if self.experts is not None else {}

    def objective_metrics(self) -> dict[str, torch.Tensor]:
        """See `Engine.objective_metrics`: one all-reduce of the [sum, count] pairs."""
        sums = self.objective.take_metrics()
        if not sums:
            return {}
        names = sorted(sums)
        stacked = torch.stack([sums[n] for n in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked)
        # Ranks that hold the same rows (tensor-parallel peers) scale sum and count alike.
        return {n: stacked[i, 0] / stacked[i, 1].clamp(min=1) for i, n in enumerate(names)}


def mean_over_ranks(loss: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """The step's loss as one number on every rank: the sum over all ranks divided by the
    `num_ranks` that hold a loss (other ranks, such as earlier pipeline stages, add zero)."""
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    return summed / num_ranks
