"""Checkpoints through torch.distributed.checkpoint (DCP), the same code at any world size.

A checkpoint is the folder `<run_dir>/checkpoints/step-NNNNNNNN`. It is written under a `.tmp`
name and renamed into place only after every rank has finished writing, so a crash mid-save never
leaves a folder that looks complete; DCP writes its `.metadata` last, which `is_complete` also
requires. The state is a dict of `Stateful` objects (model, optimizer, scheduler, loader) plus
the step and each rank's RNG states.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from distrib.config import CheckpointConfig
from distrib.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


# Optimizer state keyed by flat names ("state.layers.0.attention.wq.weight.exp_avg"), so the
# states of several model parts (pipeline stages) merge into one dict and reshard by name.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _as_parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return model if isinstance(model, list) else [model]


class ModelState(Stateful):
    """The weights of this rank's model parts in DCP form (sharded tensors stay sharded)."""

    def __init__(self, model: nn.Module | list[nn.Module]) -> None:
        self.parts = _as_parts(model)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            # Each part takes the names it has; a pipeline stage holds only some layers.
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """One optimizer per model part, saved as one flat name-keyed dict."""

    def __init__(
        self,
        model: nn.Module | list[nn.Module],
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    ) -> None:
        self.parts = _as_parts(model)
        self.optimizers = optimizer if isinstance(optimizer, list) else [optimizer]

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            merged.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            set_optimizer_state_dict(part, opt, state_dict, options=_FLAT)


class SchedulerState(Stateful):
    """The LR schedules of all parts' optimizers, which move in lockstep: saved once."""

    def __init__(self, schedulers: list[Any]) -> None:
        self.schedulers = schedulers

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state_dict)


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: renamed into place and holding DCP's metadata file."""
    return (
        path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()
    )


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _dcp_call() -> Iterator[bool]:
    """Yield whether DCP should skip collectives; at world size 1 that is the intent, so DCP's
    warning about it says nothing the user needs."""
    single = not _distributed()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield single


def rng_key(rank: int) -> str:
    # Each rank's generators differ, and DCP keeps one copy of a replicated non-tensor value,
    # so every rank saves its RNG under its own key.
    return f"rng_rank{rank}"


class Checkpointer:
    """Saves every `interval` steps, keeps the newest `keep`, and finds where to resume."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.folder = run_dir / "checkpoints"

    def due(self, step: int, last_step: int) -> bool:
        """Whether to save after `step`: on the interval and always at the end."""
        return step == last_step or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Write `state` as the checkpoint of `step`; every rank calls this together."""
        final, tmp = step_dir(self.folder, step), self.folder / f"step-{step:08d}.tmp"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        _barrier()
        with _dcp_call() as single:
            dcp.save(dict(state), checkpoint_id=str(tmp), no_dist=single)
        _barrier()
        if _rank() == 0:
            if final.exists():  # the same step saved again (a resumed run): replace it whole
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.cfg.keep <= 0:
            return
        for old in list_checkpoints(self.folder)[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from: the newest complete one (auto), none (never), or the
        given path, which must then be a complete checkpoint."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            found = list_checkpoints(self.folder)
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume = {path}: not a complete checkpoint (expected a step-NNNNNNNN "
                "folder holding .metadata); use 'auto', 'never' or a complete checkpoint folder"
            )
        return path


def load(path: Path, state: dict[str, Any]) -> None:
    """Load `path` into `state` in place; keys the checkpoint lacks are an error, except RNG
    states of ranks that did not exist when it was saved."""
    keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    top = {k.split(".", 1)[0] for k in keys}
    wanted = {k: v for k, v in state.items() if k in top or not k.startswith("rng_rank")}
    missing = [k for k in wanted if k not in top]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing}; it holds {sorted(top)}")
    with _dcp_call() as single:
        dcp.load(wanted, checkpoint_id=str(path), no_dist=single)
    state.update(wanted)
