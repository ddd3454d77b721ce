"""The engine reduces gradients once per optimizer step, not once per micro-batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distrib.config import load_config
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.runtime import Runtime, detect_launch
from tests.support.tiny import tiny_flags

from .harness import spawn

pytestmark = pytest.mark.slow

RUN = [
    *tiny_flags(),
    "--data.seq_len=16",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=1",
]


def _record_sync(rank: int, world_size: int, layout: str, out: str) -> None:
    cfg = load_config(None, [*RUN, f"--parallel.{layout}={world_size}"])
    engine, _, _ = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    calls: list[bool] = []
    part = engine.parts[0]
    original = part.set_requires_gradient_sync
    part.set_requires_gradient_sync = lambda enabled, **kw: (
        calls.append(enabled),
        original(enabled, **kw),
    )[1]
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(4):  # 8 sequences / (1 per micro-batch x 2 ranks)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=g)
        batches.append(Batch(tokens[:, :-1], tokens[:, 1:], None))
    engine.train_step(batches)
    Path(out, f"{rank}.json").write_text(json.dumps(calls))


@pytest.mark.parametrize("layout", ["dp_shard", "dp_replicate"])
def test_gradients_sync_only_on_the_last_micro_batch(layout: str, tmp_path: Path) -> None:
    spawn(_record_sync, 2, layout, str(tmp_path))
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [False, False, False, True]
