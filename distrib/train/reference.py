"""The DPO reference: the starting model's log-probabilities of every response, computed once.

DPO compares the policy with the model it started from. Rather than keep a frozen copy of that
model next to the one that trains (twice the weights in memory, and a second parallel wrapper
for every layout and engine), one forward pass over the preference data before the first step
records the summed log-probabilities of each pair's chosen and rejected response; training then
reads them by pair id. This is TRL's `precompute_ref_log_probs`, made the only path: it works
unchanged under DDP, FSDP, HSDP and DeepSpeed, with or without LoRA (whose adapters start at
zero, so the starting model is the base).

The table is written to `<run_dir>/reference_logps.npz` with what it was computed from (the
dataset's manifest digest and `model.init_from`); a resumed run reads it back, a run whose data
or starting point changed computes it again. It is always computed before any checkpoint is
loaded, while the engine still holds the starting weights.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distrib.data.loader import Batch
from distrib.data.shards import MANIFEST_FILE
from distrib.engines.base import Engine

REFERENCE_FILE = "reference_logps.npz"


def dataset_digest(data_dir: str | Path) -> str:
    """sha256 of the dataset's manifest, which holds every shard's own sha256."""
    return hashlib.sha256((Path(data_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def compute_table(engine: Engine, loader: Any, dp_rank: int, dp_size: int) -> np.ndarray:
    """Summed log-probabilities [num_pairs, 2] (chosen, rejected) of every pair of `loader`'s
    split under the engine's current model. Every rank calls it: each computes its share of
    the pairs, then one all-reduce gives every rank the whole table."""
    n, per_rank = loader.num_samples, loader.micro_batch_size
    steps = math.ceil(n / (per_rank * dp_size))
    table = torch.zeros((n, 2), dtype=torch.float64, device=engine_device(engine))
    counts = torch.zeros((n, 1), dtype=torch.float64, device=table.device)
    for step in range(steps):
        start = (step * dp_size + dp_rank) * per_rank
        # Past the end, wrap around: every rank runs the same number of forwards (FSDP and
        # ZeRO-3 gather weights collectively), and a repeated pair gets the same value twice.
        ids = np.arange(start, start + per_rank) % n
        logps_B = engine.sequence_logps(loader.batch_of(ids)).double()
        index = torch.as_tensor(ids, device=table.device)
        table.index_add_(0, index, torch.stack(logps_B.chunk(2), dim=1))
        counts.index_add_(0, index, torch.ones_like(counts[: len(ids)]))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(table)
        dist.all_reduce(counts)
    return (table / counts.clamp(min=1)).cpu().numpy()


def engine_device(engine: Engine) -> torch.device:
    return getattr(engine, "device", torch.device("cpu"))


def load_or_compute(
    path: Path,
    recipe: dict[str, str],
    loaders: dict[str, Any],
    engine: Engine,
    dp_rank: int,
    dp_size: int,
    is_main: bool,
    log: Callable[[str], None],
) -> dict[str, np.ndarray]:
    """The reference tables of `loaders`' splits: read from `path` when it was made from the
    same `recipe` and has the same pair counts, else computed now (and written by rank 0)."""
    tables = _read(path, recipe, {split: ld.num_samples for split, ld in loaders.items()})
    if tables is not None:
        log(f"DPO reference log-probabilities read from {path}")
        return tables
    tables = {
        split: compute_table(engine, loader, dp_rank, dp_size) for split, loader in loaders.items()
    }
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **tables, **{f"recipe_{k}": np.array(v) for k, v in recipe.items()})
        os.replace(tmp, path)
    counts = ", ".join(f"{split} {len(t)}" for split, t in tables.items())
    log(f"DPO reference log-probabilities of the starting model computed ({counts} pairs): {path}")
    return tables


def _read(
    path: Path, recipe: dict[str, str], sizes: dict[str, int]
) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            if any(str(saved.get(f"recipe_{k}", "")) != v for k, v in recipe.items()):
                return None
            tables = {split: saved[split] for split in sizes if split in saved}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: computed again
    if set(tables) != set(sizes) or any(len(tables[s]) != n for s, n in sizes.items()):
        return None
    return tables


class WithReference:
    """A preference loader whose batches carry their pairs' reference log-probabilities; every
    other attribute (state, sizes) is the wrapped loader's."""

    def __init__(self, loader: Any, table: np.ndarray) -> None:
        self.loader = loader
        self.table = torch.from_numpy(table.astype(np.float32))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def attach(self, batch: Batch) -> Batch:
        """`batch` with `reference_logps` [2P]: the chosen rows' values, then the rejected."""
        assert batch.sample_ids is not None
        rows = self.table[batch.sample_ids]
        batch.reference_logps = torch.cat([rows[:, 0], rows[:, 1]])
        return batch

    def next_step(self) -> list[Batch]:
        return [self.attach(b) for b in self.loader.next_step()]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
