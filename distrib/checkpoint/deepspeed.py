"""DeepSpeed's checkpoint format inside a distrib step folder.

A step folder written by the DeepSpeed engine holds DeepSpeed's own checkpoint (each rank its
partitions) under the tag folder `deepspeed/`, and beside it each rank's other state (loader,
step, skipped steps, its RNG) in `distrib_rank<R>.pt`. DeepSpeed has no background save that
reports completion, so this format always writes synchronously.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.checkpoint.dcp import Writer
from distrib.checkpoint.state import OwnFormat, flatten, optional_keys, restore
from distrib.errors import CheckpointError
from distrib.parallel.init import clean_name
from distrib.runtime import import_deepspeed

# DeepSpeed's checkpoint tag inside a step folder: one checkpoint per folder, so a fixed name.
TAG = "deepspeed"


class DeepSpeedState:
    """A `deepspeed.DeepSpeedEngine`'s whole state (model, optimizer, LR schedule), written by
    DeepSpeed itself: the `OwnFormat` of the DeepSpeed engine. Frozen parameters (a LoRA run's
    base, rebuilt from `model.init_from`) are left out."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.frozen = any(not p.requires_grad for p in ds.module.parameters())

    def save(self, folder: Path) -> None:
        self.ds.save_checkpoint(
            str(folder),
            tag=TAG,
            client_state={},
            save_latest=False,
            exclude_frozen_parameters=self.frozen,
        )

    def load(self, folder: Path) -> None:
        if not (folder / TAG).is_dir():
            raise CheckpointError(
                f"{folder} is not a DeepSpeed checkpoint: it has no {TAG}/ folder (saved by "
                "parallel.engine = 'deepspeed')"
            )
        path, _ = self.ds.load_checkpoint(
            str(folder),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.frozen,  # the frozen base is not in the checkpoint
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {folder / TAG}")


def _split(state: Mapping[str, Any]) -> tuple[OwnFormat, dict[str, Any]]:
    own = [v for v in state.values() if isinstance(v, OwnFormat)]
    if len(own) != 1:
        raise ValueError(f"expected one self-writing engine state, got {len(own)}")
    rest = {k: v for k, v in state.items() if not isinstance(v, OwnFormat)}
    return own[0], rest


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"distrib_rank{rank}.pt"


def own_format_writer(state: Mapping[str, Any], rank: int) -> Writer:
    """A `Writer` for a state holding an `OwnFormat` engine state: that writes its files, and
    the rest goes to this rank's `distrib_rank<R>.pt`. `background` is honoured by writing now."""
    own, rest = _split(state)

    def write(folder: Path, background: bool) -> Future[Any] | None:
        own.save(folder)
        flat = flatten(rest)
        plain = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in flat.items()}
        torch.save(plain, _rank_file(folder, rank))
        return None

    return write


def _numpy_rng_globals() -> list[Any]:
    """What a pickled `np.random.get_state()` needs to load under `weights_only=True`."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # NumPy 1
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_own_format(folder: Path, state: dict[str, Any], rank: int) -> None:
    """Restore a state holding an `OwnFormat` engine state from `folder`, in place."""
    own, rest = _split(state)
    mine = _rank_file(folder, rank)
    if not mine.is_file():
        raise CheckpointError(
            f"{folder} is not a DeepSpeed checkpoint of this run's size: it has no {mine.name} "
            "(saved by parallel.engine = 'deepspeed' on as many ranks)"
        )
    own.load(folder)
    # weights_only: unpickling may not run code; the RNG entries hold NumPy's state.
    with torch.serialization.safe_globals(_numpy_rng_globals()):
        saved = torch.load(mine, map_location="cpu", weights_only=True)
    flat, optional = flatten(rest), optional_keys(rest)
    for key, value in flat.items():
        if key not in saved:
            if key in optional or key.startswith("rng_rank"):
                continue
            raise CheckpointError(f"{mine} has no '{key}'; it holds {sorted(saved)}")
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(saved[key])
    restore(rest, saved)
    for key in rest:
        if key in saved and not hasattr(rest[key], "load_state_dict"):
            state[key] = saved[key]


def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model's float32 weights from the DeepSpeed checkpoint in the step folder
    `folder` (any ZeRO stage), keyed as the bare model names them. One process, no engine: for
    generation and export."""
    # Imported for its side effect: DeepSpeed picks its accelerator on first import.
    import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tag_dir = folder / TAG
    if any(tag_dir.glob("*optim_states.pt")):  # ZeRO 1-3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
    else:  # ZeRO-0: rank 0 saved the whole module
        saved = torch.load(
            tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
        )
        state = saved["module"]
    return {clean_name(k): v.float() for k, v in state.items()}
