"""Checkpoints through torch.distributed.checkpoint (DCP), the same code at any world size.

A checkpoint is the folder `<run_dir>/checkpoints/step-NNNNNNNN`. It is written under a `.tmp`
name; once every rank has finished writing, rank 0 adds `manifest.json` (sizes, checksums,
layout) and renames the folder into place, so a crash mid-save never leaves a folder that looks
complete. Resuming checks the manifest and falls back past damaged checkpoints (`manifest.py`). The state is a dict of `Stateful` objects (model, optimizer, scheduler, loader) plus
the step and each rank's RNG states.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from distrib import manifest
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
    """A finished checkpoint: renamed into place and holding its manifest, written last."""
    return (
        path.is_dir()
        and _STEP_DIR.match(path.name) is not None
        and (path / manifest.MANIFEST).is_file()
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


# One process saves in the background too where DCP allows it (torch >= 2.12 has no_dist there).
_ASYNC_NO_DIST = "no_dist" in inspect.signature(dcp.async_save).parameters

# Writes one checkpoint's files into a folder, in the background when asked (returning a future
# that completes when the files are on disk), else before returning None.
Writer = Callable[[Path, bool], "Future[Any] | None"]


def dcp_writer(
    state: Mapping[str, Any],
    process_group: dist.ProcessGroup | None = None,
    stager: AsyncStager | None = None,
) -> Writer:
    """A `Writer` that saves `state` with DCP; in the background through `dcp.async_save`, whose
    collectives run on `process_group` so they never interleave with training's."""

    def write(folder: Path, background: bool) -> Future[Any] | None:
        with _dcp_call() as single:
            if background and (not single or _ASYNC_NO_DIST):
                extra = {"no_dist": True} if single else {"process_group": process_group}
                if stager is not None:
                    extra["async_stager"] = stager
                return dcp.async_save(dict(state), checkpoint_id=str(folder), **extra)  # type: ignore[return-value]
            dcp.save(dict(state), checkpoint_id=str(folder), no_dist=single)
        return None

    return write


def _caching_stager() -> AsyncStager:
    """DCP's stager, kept for the run: it copies the state into CPU buffers it reuses from one
    save to the next (pinned on GPU machines), in the training thread, so training may change
    the tensors as soon as `save` returns."""
    cuda = torch.cuda.is_available()
    options = StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,
        use_async_staging=False,
        use_non_blocking_copy=cuda,
    )
    return DefaultStager(options)


@dataclass
class _Pending:
    """A checkpoint still being written in the background."""

    step: int
    future: Future[Any]
    finisher: threading.Thread | None = None  # rank 0: waits, writes the manifest, renames
    error: BaseException | None = None


class Checkpointer:
    """Saves every `interval` steps (synchronously or in the background), keeps the newest
    `keep`, and finds a valid checkpoint to resume from."""

    def __init__(
        self, cfg: CheckpointConfig, run_dir: Path, info: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.folder = run_dir / "checkpoints"
        self.info = info or {}  # recorded in each manifest: layout, config
        self._pending: _Pending | None = None
        # Background saves run their collectives on a group of their own (gloo, which also
        # carries CPU tensors), so that they never interleave with training's collectives.
        self.group = dist.new_group(backend="gloo") if cfg.async_save and _distributed() else None
        # Background saves copy the state into CPU buffers kept from one save to the next:
        # allocating (and page-faulting) fresh ones each time doubled the training stall.
        self.stager = _caching_stager() if cfg.async_save else None

    def due(self, step: int, last_step: int) -> bool:
        """Whether to save after `step`: on the interval and always at the end."""
        return step == last_step or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def save(self, step: int, state: Mapping[str, Any] | Writer, background: bool = False) -> Path:
        """Write the checkpoint of `step`: `state` (saved with DCP) or what a `Writer` writes.
        Every rank calls this together. In the background the call returns once the state is
        staged; the folder appears when the files are on disk (`wait()` to be sure)."""
        self.wait()
        final, tmp = step_dir(self.folder, step), self.folder / f"step-{step:08d}.tmp"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        _barrier()
        write = state if callable(state) else dcp_writer(state, self.group, self.stager)
        try:
            future = write(tmp, background)
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            self._discard(tmp)
            raise CheckpointError(
                f"saving step {step} to {tmp} failed ({type(err).__name__}: {err}); the previous "
                f"checkpoints in {self.folder} are intact"
            ) from err
        if future is not None:
            pending = _Pending(step, future)
            if _rank() == 0:
                pending.finisher = threading.Thread(
                    target=self._finish_in_background, args=(pending, tmp, final), daemon=True
                )
                pending.finisher.start()
            self._pending = pending
            return final
        _barrier()
        digests = manifest.hash_files(tmp, manifest.data_files(tmp) if _rank() == 0 else [])
        if _rank() == 0:
            self._finish(step, tmp, final, digests)
        _barrier()
        return final

    def _discard(self, tmp: Path) -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _finish(self, step: int, tmp: Path, final: Path, digests: dict[str, str]) -> None:
        """Rank 0: manifest last, then rename into place, then drop the oldest."""
        manifest.write(tmp, digests, {"step": step, **self.info})
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()

    def _finish_in_background(self, pending: _Pending, tmp: Path, final: Path) -> None:
        try:
            pending.future.result()
            names = manifest.data_files(tmp)
            self._finish(pending.step, tmp, final, manifest.hash_files(tmp, names, False))
        except BaseException as err:  # reported by wait(), on the training thread
            pending.error = err
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self) -> None:
        """Block until a background save has finished; raise if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error: BaseException | None = None
        try:
            pending.future.result()
        except BaseException as err:
            error = err
        if pending.finisher is not None:
            pending.finisher.join()
            error = error or pending.error
        if error is not None:
            raise CheckpointError(
                f"background save of step {pending.step} failed ({type(error).__name__}: "
                f"{error}); the previous checkpoints in {self.folder} are intact"
            ) from error

    def _prune(self) -> None:
        if self.cfg.keep <= 0:
            return
        for old in list_checkpoints(self.folder)[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_path(self, report: Callable[[str], None] = print) -> Path | None:
        """The checkpoint to resume from: the newest intact one (auto), none (never), or the
        given path, which must then be intact. A damaged checkpoint met on the way under auto is
        reported and skipped; every rank calls this together (the checks are shared)."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            found = self.problems(path)
            if found:
                raise CheckpointError(
                    f"checkpoint.resume = {path} is not a valid checkpoint: {'; '.join(found[:5])}. "
                    "Use 'auto', 'never' or an intact step-NNNNNNNN folder"
                )
            return path
        return self.newest_valid(report)

    def newest_valid(self, report: Callable[[str], None] = print) -> Path | None:
        """The newest intact checkpoint; damaged newer ones are reported and passed over."""
        for path in reversed(self._candidates()):
            found = self.problems(path)
            if not found:
                return path
            report(
                f"checkpoint {path} is damaged and is skipped: {'; '.join(found[:5])}"
                + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
            )
        return None

    def _candidates(self) -> list[Path]:
        """step-NNNNNNNN folders, oldest first, complete or not: a folder with no manifest is
        one whose save never finished yet was renamed (impossible here, but a copy or a sync
        tool can produce one) and must be reported, not silently resumed."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]

    def problems(self, path: Path) -> list[str]:
        """What is wrong with checkpoint `path` ([] when intact)."""
        if not path.is_dir():
            return [f"{path}: no such folder"]
        if _STEP_DIR.match(path.name) is None:
            return [f"{path}: not a step-NNNNNNNN folder"]
        return manifest.problems(path, self.cfg.verify)


def _optional(key: str) -> bool:
    # RNG states of ranks the saving run did not have, and keys older checkpoints lack.
    return key.startswith("rng_rank") or key in ("skip_steps",)


def load(path: Path, state: dict[str, Any]) -> None:
    """Load `path` into `state` in place; keys the checkpoint lacks are an error, except RNG
    states of ranks that did not exist when it was saved."""
    keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    top = {k.split(".", 1)[0] for k in keys}
    wanted = {k: v for k, v in state.items() if k in top or not _optional(k)}
    missing = [k for k in wanted if k not in top]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing}; it holds {sorted(top)}")
    with _dcp_call() as single:
        dcp.load(wanted, checkpoint_id=str(path), no_dist=single)
    state.update(wanted)
