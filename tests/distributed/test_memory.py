"""With dp_shard = N each rank holds 1/N of the parameters and of the optimizer state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from distrib.config import load_config
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.runtime import Runtime, detect_launch
from tests.support.tiny import tiny_flags

from .harness import spawn

pytestmark = pytest.mark.slow

RUN = [
    *tiny_flags(),
    "--data.seq_len=32",
    "--training.global_batch_size=4",
    "--training.micro_batch_size=1",
]


def _local(t: torch.Tensor) -> int:
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def _count(rank: int, world_size: int, out: str) -> None:
    cfg = load_config(None, [*RUN, f"--parallel.dp_shard={world_size}"])
    engine, _, _ = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    shape = (1, cfg.data.seq_len + 1)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    engine.train_step([Batch(tokens[:, :-1], tokens[:, 1:], None)])
    params = [p for part in engine.parts for p in part.parameters()]
    states = [
        t
        for opt in engine.optimizers
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.ndim > 0
    ]
    record = {
        "full_params": sum(p.numel() for p in params),
        "rows": sum(p.numel() // p.shape[0] for p in params),  # at most one row of rounding each
        "local_params": sum(_local(p) for p in params),
        "local_optimizer": sum(_local(t) for t in states),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_holds_a_shard(world_size: int, tmp_path: Path) -> None:
    spawn(_count, world_size, str(tmp_path))
    for rank in range(world_size):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        share = r["full_params"] / world_size
        assert abs(r["local_params"] - share) <= r["rows"], r
        # AdamW keeps two moments per parameter element, sharded like the parameters.
        assert abs(r["local_optimizer"] - 2 * share) <= 2 * r["rows"], r
