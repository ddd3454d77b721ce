"""The DeepSpeed engine's optimizer, and the gate that lets the training loop veto an update.

The loop's `accept` veto needs the global gradient norm, which DeepSpeed computes inside its
optimizer step, after the gradients are reduced and before they are applied. So the base
optimizer's `step` is gated (`UpdateGate`): the first time DeepSpeed calls it in a step, the gate
asks `accept` with DeepSpeed's own norm; a refusal turns every call of that step into a no-op, so
parameters, moments and step counters stay as they were, while DeepSpeed still advances the LR
schedule.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distrib.config import TrainingConfig
from distrib.engines.optim import param_groups


class UpdateGate:
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


def install_gate(optimizer: torch.optim.Optimizer, gate: UpdateGate) -> None:
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
