"""Debug fault injection (the `[debug]` section): a NaN loss on chosen ranks at a chosen step, a
rank that sleeps every step, and a record of the samples each rank trains on.

Kept out of the engines: the NaN enters through a forward hook on the model, so every engine
sees an ordinary non-finite loss and gradients, as from a real divergence.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from distrib.config import DebugConfig
from distrib.data.loader import Batch


@contextlib.contextmanager
def poisoned(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s output is multiplied by NaN: the loss and every gradient it
    reaches become NaN on this rank, as a diverging step would make them."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return output * float("nan")

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Faults:
    """The faults `debug` asks this rank to inject."""

    def __init__(self, debug: DebugConfig, rank: int, run_dir: Path) -> None:
        self.debug = debug
        self.rank = rank
        self.samples_file = run_dir / "samples" / f"rank{rank}.jsonl"

    def nan_at(self, step: int) -> bool:
        """Whether this rank's loss is made NaN at `step`."""
        d = self.debug
        return d.nan_at_step == step and d.nan_rank in (-1, self.rank)

    def step_context(self, model: nn.Module, step: int) -> contextlib.AbstractContextManager[Any]:
        """The context the training step of `step` runs in."""
        return poisoned(model) if self.nan_at(step) else contextlib.nullcontext()

    def sleep(self) -> None:
        """debug.straggler_rank sleeps debug.straggler_sleep_s, to test straggler reports."""
        d = self.debug
        if d.straggler_sleep_s > 0 and self.rank == d.straggler_rank:
            time.sleep(d.straggler_sleep_s)

    def record_samples(self, step: int, batches: list[Batch]) -> None:
        """With debug.record_samples, log which sequences this rank trains on at `step`, so
        that a test can prove every sample is consumed exactly once across resumes."""
        if not self.debug.record_samples:
            return
        self.samples_file.parent.mkdir(parents=True, exist_ok=True)
        ids = [int(i) for b in batches if b.sample_ids is not None for i in b.sample_ids]
        with self.samples_file.open("a") as f:
            f.write(json.dumps({"step": step, "samples": ids}) + "\n")
