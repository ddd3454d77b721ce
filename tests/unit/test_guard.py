"""The update guard: NaN/Inf and spikes refused; a refused step leaves weights and optimizer
state untouched while the schedule advances."""

from __future__ import annotations

import math

import torch

from distrib.config import load_config
from distrib.data.loader import Batch
from distrib.engines.native import NativeEngine
from distrib.models.build import build_model
from distrib.train.faults import poisoned
from distrib.train.guard import LossGuard, failing_ranks
from tests.support.tiny import tiny_config
from tests.unit.test_checkpoint import TINY


def _batch(seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, tiny_config().vocab_size, (2, 17), generator=gen)
    return [Batch(tokens[:, :-1], tokens[:, 1:])]


def test_refuses_non_finite_and_remembers_why() -> None:
    guard = LossGuard()
    assert guard(torch.tensor(2.0), torch.tensor(1.0)) and guard.event is None
    assert not guard(torch.tensor(math.nan), torch.tensor(1.0))
    assert guard.event is not None and guard.event.reason == "non-finite"
    assert not guard(torch.tensor(2.0), torch.tensor(math.inf))
    assert "grad norm inf" in guard.event.describe()


def test_spikes_against_the_running_mean() -> None:
    guard = LossGuard(spike_threshold=2.0, spike_window=4)
    assert guard(torch.tensor(9.0), torch.tensor(1.0))  # too few values yet to judge a spike
    for value in (3.0, 3.0, 3.0):
        assert guard(torch.tensor(value), torch.tensor(1.0))
    mean = (9 + 3 + 3 + 3) / 4
    assert not guard(torch.tensor(2.0 * mean + 0.1), torch.tensor(1.0))
    assert guard.event is not None and guard.event.reason == "spike"
    assert "running mean" in guard.event.describe()
    assert len(guard.recent) == 4  # a refused value does not enter the mean
    assert guard(torch.tensor(3.0), torch.tensor(1.0))


def test_failing_ranks_single_process() -> None:
    assert failing_ranks(torch.tensor(math.nan)) == [0]
    assert failing_ranks(torch.tensor(1.0)) == []


def test_refused_step_keeps_weights_and_optimizer_but_advances_schedule() -> None:
    cfg = load_config(None, TINY)
    engine = NativeEngine(
        [build_model(cfg.model, torch.device("cpu"), 0)], cfg.training, torch.device("cpu")
    )
    engine.train_step(_batch(0))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    opt_before = {k: v["step"].clone() for k, v in engine.optimizers[0].state.items()}
    with poisoned(engine.model):
        result = engine.train_step(_batch(1), accept=LossGuard())
    assert result.skipped and math.isnan(float(result.loss))
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: v["step"] for k, v in engine.optimizers[0].state.items()} == opt_before
    assert all(p.grad is None for p in engine.model.parameters())
    assert engine.schedulers[0].last_epoch == 2  # the schedule moved on
    # The next healthy step updates normally.
    assert not engine.train_step(_batch(2), accept=LossGuard()).skipped
    assert any(not torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())
