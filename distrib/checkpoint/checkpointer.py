"""Saving, keeping and finding checkpoints, the same code at any world size and for both engines.

A checkpoint is the folder `<run_dir>/checkpoints/step-NNNNNNNN`. It is written under a `.tmp`
name; once every rank has finished writing, rank 0 adds `manifest.json` (sizes, checksums,
layout) and renames the folder into place, so a crash mid-save never leaves a folder that looks
complete. Resuming checks the manifest and falls back past damaged checkpoints (`manifest.py`).

What is saved is a dict of `Stateful` objects (`state.py`): the engine's and the trainer's. The
files are DCP's (`dcp.py`), unless the engine's state writes its own (DeepSpeed, `deepspeed.py`).
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from distrib.checkpoint import manifest
from distrib.checkpoint.dcp import Writer, caching_stager, dcp_writer, distributed
from distrib.checkpoint.dcp import load as dcp_load
from distrib.checkpoint.lora_base import base_record, check_lora_fits
from distrib.checkpoint.run_folder import RunFolder
from distrib.checkpoint.state import OwnFormat
from distrib.config import CheckpointConfig
from distrib.errors import CheckpointError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def _rank() -> int:
    return dist.get_rank() if distributed() else 0


def _barrier() -> None:
    if distributed():
        dist.barrier()


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
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        info: dict[str, Any] | None = None,
        owner: RunFolder | None = None,
    ) -> None:
        self.cfg = cfg
        self.folder = run_dir / "checkpoints"
        # The run whose checkpoints these are: only they are resumed from and pruned. None
        # where the folder has no identity (written before runs had one): all are its own.
        self.owner = owner
        # Recorded in each manifest: layout, config, the run that wrote it, and the digest of
        # the frozen base a LoRA run's adapters sit on (hashed here, once, by every rank).
        self.info = {**(info or {}), **({"run_id": owner.run_id} if owner else {})}
        self.info.update(base_record(self.info.get("config", {})))
        self._pending: _Pending | None = None
        # Background saves run their collectives on a group of their own (gloo, which also
        # carries CPU tensors), so that they never interleave with training's collectives.
        self.group = dist.new_group(backend="gloo") if cfg.async_save and distributed() else None
        # Background saves copy the state into CPU buffers kept from one save to the next:
        # allocating (and page-faulting) fresh ones each time doubled the training stall.
        self.stager = caching_stager() if cfg.async_save else None

    def due(self, step: int, last_step: int) -> bool:
        """Whether to save after `step`: on the interval and always at the end."""
        return step == last_step or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def _writer(self, state: Mapping[str, Any]) -> Writer:
        """DCP's, unless the engine's state writes its own files."""
        if any(isinstance(v, OwnFormat) for v in state.values()):
            from distrib.checkpoint.deepspeed import own_format_writer

            return own_format_writer(state, _rank())
        return dcp_writer(state, self.group, self.stager)

    def save(self, step: int, state: Mapping[str, Any], background: bool = False) -> Path:
        """Write the checkpoint of `step` from `state` (`Stateful` objects and plain values).
        Every rank calls this together. In the background the call returns once the state is
        staged; the folder appears when the files are on disk (`wait()` to be sure)."""
        self.wait()
        final, tmp = step_dir(self.folder, step), self.folder / f"step-{step:08d}.tmp"
        if _rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        _barrier()
        write = self._writer(state)
        try:
            future = write(tmp, background)
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            self._discard(tmp)
            raise CheckpointError(
                f"saving step {step} to {tmp} failed ({cause(err)}); the previous "
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
                f"background save of step {pending.step} failed ({cause(error)}); the previous "
                f"checkpoints in {self.folder} are intact"
            ) from error

    def _prune(self) -> None:
        """Drop this run's oldest checkpoints beyond `keep`; another run's are never touched."""
        if self.cfg.keep <= 0:
            return
        own = [p for p in list_checkpoints(self.folder) if self.owns(p)]
        for old in own[: -self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def owns(self, path: Path) -> bool:
        """Whether checkpoint `path` belongs to the run this checkpointer saves for."""
        return self.owner is None or self.owner.owns(path)

    def resume_path(self, report: Callable[[str], None] = print) -> Path | None:
        """The checkpoint to resume from: the newest intact one (auto), none (never), or the
        given path, which must then be intact. A damaged checkpoint met on the way under auto is
        reported and skipped; every rank calls this together (the checks are shared)."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            found = self.problems(path)
            if not found and path.parent.resolve() == self.folder.resolve() and not self.owns(path):
                found = [f"{path} was written by another run than the one owning {self.folder}"]
            if found:
                raise CheckpointError(
                    f"checkpoint.resume = {path} is not a valid checkpoint: {'; '.join(found[:5])}. "
                    "Use 'auto', 'never' or an intact step-NNNNNNNN folder"
                )
            return path
        return self.newest_valid(report)

    def newest_valid(self, report: Callable[[str], None] = print) -> Path | None:
        """The newest intact checkpoint; damaged newer ones are reported and passed over."""
        for path in reversed(self.candidates()):
            found = self.problems(path)
            if not found:
                return path
            report(
                f"checkpoint {path} is damaged and is skipped: {'; '.join(found[:5])}"
                + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
            )
        return None

    def candidates(self) -> list[Path]:
        """step-NNNNNNNN folders, oldest first, complete or not: a folder with no manifest is
        one whose save never finished yet was renamed (impossible here, but a copy or a sync
        tool can produce one) and must be reported, not silently resumed."""
        if not self.folder.is_dir():
            return []
        found = [
            p
            for p in self.folder.iterdir()
            if p.is_dir() and _STEP_DIR.match(p.name) and self.owns(p)
        ]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]

    def problems(self, path: Path) -> list[str]:
        """What is wrong with checkpoint `path` ([] when intact)."""
        if not path.is_dir():
            return [f"{path}: no such folder"]
        if _STEP_DIR.match(path.name) is None:
            return [f"{path}: not a step-NNNNNNNN folder"]
        return manifest.problems(path, self.cfg.verify)

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Restore `state` in place from the checkpoint `path`; every rank calls it together.
        A checkpoint of a model of another shape is refused, naming what differs."""
        model = self.info.get("config", {}).get("model", {})
        check_lora_fits(path, self.info)
        if any(isinstance(v, OwnFormat) for v in state.values()):
            from distrib.checkpoint.deepspeed import load_own_format

            check_model_fits(path, model)
            load_own_format(path, state, _rank())
        else:
            # DCP's load names the first tensor whose shape differs, with both shapes; a model
            # with fewer layers loads by name without complaint and is refused just after.
            dcp_load(path, state)
            check_model_fits(path, model)


# Model keys that leave every parameter's shape as it is: a run may change them on resume
# (a longer context, another attention kernel). Any other difference means other tensors.
_SHAPE_FREE = frozenset(
    {"attention", "init_std", "init_from", "max_seq_len", "rope_theta", "norm_eps"}
)
_NEW_RUN = (
    "start a new run folder (job.run_dir), or start over in this one with "
    "checkpoint.resume = never and job.overwrite = true"
)


def check_model_fits(path: Path, model: dict[str, Any]) -> None:
    """Raise CheckpointError if the checkpoint `path` was written by a model whose parameters
    have other shapes than the model config `model` (as in its manifest)."""
    try:
        saved = manifest.read(path).get("config", {}).get("model")
    except ValueError:
        return  # validation reports a damaged manifest
    if not isinstance(saved, dict):
        return  # an older manifest without the config: DCP's tensor check still applies
    differ = [
        f"model.{k} = {saved[k]!r} there, {model[k]!r} now"
        for k in sorted(set(saved) & set(model) - _SHAPE_FREE)
        if saved[k] != model[k]
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} holds a model of another shape ({'; '.join(differ)}): its "
            f"weights cannot be loaded into this one; {_NEW_RUN}"
        )


def cause(err: BaseException) -> str:
    """One line saying why a save failed. DCP's CheckpointException carries each rank's
    exception with its whole traceback in its message; name the first rank's error instead."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = sorted(failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {cause(inner)}" if isinstance(inner, BaseException) else str(inner)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
