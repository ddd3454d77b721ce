"""Optimizer parameter groups and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from distrib.config import load_config
from distrib.engines.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def _training(**kw: object):
    return load_config(None, [f"--training.{k}={v}" for k, v in kw.items()]).training


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_no_decay_on_norms_and_biases() -> None:
    net = _Net()
    decay, no_decay = param_groups(net, 0.1)
    assert {id(p) for p in decay["params"]} == {id(net.emb.weight), id(net.lin.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(net.lin.bias),
        id(net.norm.weight),
        id(net.norm.bias),
    }
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_build_optimizer_on_cpu_uses_foreach() -> None:
    opt = build_optimizer(_Net(), _training(lr=0.01, min_lr=0.001))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedules_warm_up_then_decay(schedule: str) -> None:
    cfg = _training(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule=schedule)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(factors[:10], factors[1:10], strict=False))
    tail = factors[10:]
    assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:], strict=False))
    end = lr_factor(100, cfg)
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_cosine_midpoint_and_wsd_plateau() -> None:
    cfg = _training(steps=110, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="cosine")
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    wsd = _training(
        steps=100, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="wsd", decay_fraction=0.2
    )
    assert lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5)


def test_scheduler_drives_optimizer_and_round_trips() -> None:
    cfg = _training(steps=20, warmup_steps=4, lr=0.5, min_lr=0.05)
    net = _Net()
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    again = build_scheduler(build_optimizer(net, cfg), cfg)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == sched.last_epoch
    assert math.isclose(again.get_last_lr()[0], sched.get_last_lr()[0])
