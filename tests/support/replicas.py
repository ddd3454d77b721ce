"""For the fault-tolerance tests (through launch/train.sh and under Slurm): a torchft lighthouse
in the test process, and a replica group's final checkpoint as one flat dict to compare."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def lighthouse(min_replicas: int = 1) -> Iterator[str]:
    """A lighthouse on a free port for the duration; yields its http://host:port. A dead group
    is dropped after 2 s without heartbeats."""
    os.environ.setdefault("RUST_LOG", "warn")  # no INFO line per quorum in the test's output
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(
        bind="[::]:0",
        min_replicas=min_replicas,
        join_timeout_ms=10000,
        quorum_tick_ms=10,
        heartbeat_timeout_ms=2000,
    )
    try:
        yield server.address()
    finally:
        server.shutdown()


def final_state(run_dir: Path, tmp: Path, step: int) -> dict:
    """The checkpoint of `step` as one flat dict of tensors and values, the RNG states left out
    (each group draws its own)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run_dir.parent.name}-{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step:08d}", out)
    state = torch.load(out, weights_only=False)
    flat: dict = {}

    def walk(value: object, key: str) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                walk(inner, f"{key}/{name}")
        else:
            flat[key] = value

    walk({k: v for k, v in state.items() if not k.startswith("rng")}, "")
    return flat


def assert_same_state(groups: list[Path], tmp: Path, step: int) -> None:
    """Bitwise the same weights, optimizer moments, schedule and loader position in every
    group's checkpoint of `step`."""
    want = final_state(groups[0], tmp, step)
    assert len(want) > 100  # every weight, its moments, the schedule, the loader
    for group in groups[1:]:
        got = final_state(group, tmp, step)
        assert want.keys() == got.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[key]), (group.name, key)
            else:
                assert value == got[key], (group.name, key)
