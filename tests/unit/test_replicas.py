"""Fault-tolerant replica groups without processes: the config rules, the environment a group
needs, and DiLoCo's outer step (torchft's, as `sync_wrapper` configures it) against a reference
written out here."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distrib.config import Config, load_config
from distrib.config.replica_rules import replica_group_config
from distrib.errors import ConfigError, UserError

pytest.importorskip("torchft")

from distrib.parallel.replicas import (  # noqa: E402  (after the skip: needs torchft)
    outer_optimizer,
    replica_group_index,
    replica_group_run,
    sync_wrapper,
)


def _config(*overrides: str) -> Config:
    return load_config(None, list(overrides))


FT = ["--parallel.fault_tolerance=true", "--parallel.dp_replicate=2"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["--training.sync=diloco"], "parallel.fault_tolerance = true"),
        ([*FT, "--training.sync=diloco", "--training.sync_delay=8"], "sync_delay (8)"),
        ([*FT, "--training.sync=local_sgd", "--training.sync_delay=2"], "delays DiLoCo"),
        (
            [
                *FT,
                "--training.sync=diloco",
                "--checkpoint.interval=100",
                "--training.sync_every=16",
            ],
            "multiple of training.sync_every",
        ),
        ([*FT, "--training.global_batch_size=15"], "multiple of it"),
        ([*FT, "--parallel.min_replica_groups=3"], "min_replica_groups (3)"),
        ([*FT, "--parallel.engine=deepspeed"], "not supported with parallel.engine"),
        ([*FT, "--training.on_nonfinite=rollback"], "on_nonfinite = 'rollback'"),
        ([*FT, "--training.sync=diloco", "--training.sync_merge=2"], "sync_merge"),
        (["--training.optimizer=sgd", "--training.momentum=1"], "momentum"),
        ([*FT[:1], "--parallel.dp_replicate=-1", "--parallel.dp_shard=1"], "must be given"),
    ],
)
def test_refused_with_the_key_named(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        _config(*overrides)
    assert words in str(err.value)


def test_a_group_is_the_layout_without_replication_and_its_share_of_the_batch() -> None:
    cfg = _config(*FT, "--training.global_batch_size=16", "--job.run_dir=runs/x")
    group = replica_group_config(cfg)
    assert (group.parallel.dp_replicate, group.training.global_batch_size) == (1, 8)
    assert replica_group_run(cfg, 1).job.run_dir == "runs/x/group1"


def test_the_group_and_lighthouse_come_from_the_environment() -> None:
    cfg = _config(*FT)
    env = {"DISTRIB_REPLICA_GROUP": "1", "TORCHFT_LIGHTHOUSE": "http://h:29510"}
    assert replica_group_index(cfg, env) == 1
    for bad, words in [
        ({"DISTRIB_REPLICA_GROUP": "1"}, "$TORCHFT_LIGHTHOUSE"),
        ({**env, "DISTRIB_REPLICA_GROUP": "2"}, "0..1"),
        ({**env, "DISTRIB_REPLICA_GROUP": "x"}, "'x'"),
    ]:
        with pytest.raises(UserError) as err:
            replica_group_index(cfg, bad)
        assert words in str(err.value)


class _Done:
    def wait(self) -> bool:
        return True


class _OnePeer:
    """A torchft manager stand-in with one other replica group, whose pseudo-gradients are the
    tensors `peer` yields in turn: each all-reduce averages with the next of them."""

    _use_async_quorum = False

    def __init__(self, peer: list[torch.Tensor]) -> None:
        self.peer = iter(peer)
        self.step = 0

    def allreduce(self, tensor: torch.Tensor, should_quantize: bool = False) -> _Done:
        tensor.add_(next(self.peer)).div_(2)
        return _Done()

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def current_step(self) -> int:
        return self.step

    def register_state_dict_fn(self, *args: object) -> None: ...
    def start_quorum(self, *args: object, **kwargs: object) -> None: ...
    def allow_state_dict_read(self) -> None: ...
    def disallow_state_dict_read(self) -> None: ...


def test_diloco_outer_step_equals_the_reference() -> None:
    """Three rounds of H = 2 inner SGD steps; after each, the pseudo-gradient (round start minus
    round end) averaged with the peer's, and an outer Nesterov step from the round start."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = [p.detach().clone() for p in model.parameters()]
    t = dataclasses.replace(
        _config(*FT, "--training.sync=diloco", "--checkpoint.interval=0").training,
        sync_every=2,
        outer_lr=0.7,
        outer_momentum=0.9,
    )
    data = [torch.randn(8, 4) for _ in range(6)]
    peer = [torch.randn(p.shape) * 0.01 for _ in range(3) for p in model.parameters()]

    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = SimpleNamespace(parts=[model], optimizers=[inner])
    with sync_wrapper(_OnePeer(peer), engine, t, outer_optimizer([model], t)):
        for x in data:
            inner.zero_grad()
            model(x).pow(2).mean().backward()
            inner.step()

    # The reference: plain tensors, the DiLoCo paper's algorithm.
    reference = nn.Linear(4, 3)
    with torch.no_grad():
        for p, s in zip(reference.parameters(), start, strict=True):
            p.copy_(s)
    ref_inner = torch.optim.SGD(reference.parameters(), lr=0.1)
    outer_state = [torch.zeros_like(s) for s in start]
    peers = iter(peer)
    for rnd in range(3):
        round_start = [p.detach().clone() for p in reference.parameters()]
        for x in data[2 * rnd : 2 * rnd + 2]:
            ref_inner.zero_grad()
            reference(x).pow(2).mean().backward()
            ref_inner.step()
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(reference.parameters(), round_start, strict=True)):
                delta = (s - p + next(peers)) / 2
                outer_state[i] = delta.clone() if rnd == 0 else 0.9 * outer_state[i] + delta
                p.copy_(s - 0.7 * (delta + 0.9 * outer_state[i]))
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.weight, start[0])
