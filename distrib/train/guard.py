"""Decide whether a step's update may be applied: refuse NaN / Inf losses and gradient norms, and
(optionally) loss spikes against a running mean. The decision reads values that are the same on
every rank, so all ranks skip, roll back or stop together."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Event:
    """Why a step's update was refused."""

    reason: str  # "non-finite" or "spike"
    loss: float
    grad_norm: float
    mean: float | None = None  # the running mean a spike was measured against

    def describe(self) -> str:
        if self.reason == "spike":
            return (
                f"loss spike: {self.loss:.4g} is {self.loss / (self.mean or 1):.1f}x the running "
                f"mean {self.mean:.4g} (grad norm {self.grad_norm:.4g})"
            )
        return f"non-finite values: loss {self.loss}, grad norm {self.grad_norm}"


class LossGuard:
    """The `accept` callback of `Engine.train_step`, remembering why it last refused."""

    def __init__(self, spike_threshold: float = 0.0, spike_window: int = 50) -> None:
        self.spike_threshold = spike_threshold
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.event: Event | None = None

    def __call__(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        # One device-to-host copy for both numbers: this is the step's only synchronization.
        value, norm = torch.stack([loss.float(), grad_norm.float()]).tolist()
        self.event = None
        if not (math.isfinite(value) and math.isfinite(norm)):
            self.event = Event("non-finite", value, norm)
            return False
        # A spike is judged only once the window is at least half full: early losses fall fast.
        if self.spike_threshold > 0 and len(self.recent) >= max(1, self.recent.maxlen // 2):  # type: ignore[operator]
            mean = sum(self.recent) / len(self.recent)
            if value > self.spike_threshold * mean:
                self.event = Event("spike", value, norm, mean)
                return False
        self.recent.append(value)
        return True


def failing_ranks(local_loss: torch.Tensor | None) -> list[int]:
    """Ranks whose own loss is not finite; every rank calls this together (after a refusal).
    Empty when the losses are finite and only the (global) gradient norm is not."""
    bad = local_loss is not None and not bool(torch.isfinite(local_loss).all())
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if bad else []
    flags: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bad)
    return [r for r, flag in enumerate(flags) if flag]
