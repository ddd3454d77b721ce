"""AdamW (or SGD) with decoupled weight decay on matrices only, and warmup + decay learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from distrib.config import TrainingConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay matrices (linear weights, embeddings); never norms or biases (1-D tensors).
    Frozen parameters (a LoRA run's base) are left out, and so is a group left empty (LoRA
    adapters are all matrices): DCP's flattened optimizer state cannot name an empty group."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD, `training.optimizer`), fused on CUDA (one kernel for all parameters),
    foreach elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    if cfg.optimizer == "sgd":
        # SGD's update is linear in the gradient: local SGD with sync_every = 1 is then exactly
        # every-step data parallelism, which is how the sync modes are tested.
        return torch.optim.SGD(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            fused=True if on_cuda else None,
            foreach=None if on_cuda else True,
        )
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier on `cfg.lr` for the update that follows `step` optimizer steps.

    Linear warmup from lr/warmup to lr, then decay to min_lr by the last step: cosine, linear,
    WSD (constant, then a linear cool-down over the final `decay_fraction` of steps) or constant.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> LambdaLR:
    """A LambdaLR over `lr_factor`; its state_dict is just the step count, so it checkpoints."""
    schedule: Callable[[int], float] = lambda step: lr_factor(step, cfg)  # noqa: E731
    return LambdaLR(optimizer, schedule)
