"""A run folder belongs to one run: a lock while it trains, and an identity on every checkpoint.

`<run_dir>/run.json` names the run that owns the folder (a random id); every checkpoint's
manifest records the id of the run that wrote it. Resuming, retention and `resume = never` only
ever touch the checkpoints of the run being continued, so a fresh run can never inherit (or
delete) another run's checkpoints. A fresh run in a folder another run used is refused unless
`job.overwrite = true`, which moves the old contents into `<run_dir>/previous/` (never deletes).

`<run_dir>/.lock` is held with `flock` by rank 0 for the run's lifetime: the kernel releases it
when the process dies however it dies, so a crashed holder never blocks the next run. Checkpoint
saves a crash left unfinished (`step-N.tmp`) are removed once the lock is held: no one else can be
writing them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distrib.checkpoint import manifest
from distrib.errors import CheckpointError, ConfigError, UserError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PREVIOUS = "previous"

try:  # not on Windows, where the folder goes unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class RunFolder:
    """The run that owns a run folder, as every rank knows it; rank 0 also holds the lock."""

    path: Path
    run_id: str
    # Checkpoints without a run id (written before runs had one) belong to this run: it is the
    # one that continued them.
    adopted: bool = False
    notes: list[str] = field(default_factory=list)  # what claiming did, for the run's log
    _lock: int | None = None

    def owns(self, checkpoint: Path) -> bool:
        """Whether the checkpoint folder was written by this run (by its manifest)."""
        try:
            run_id = manifest.read(checkpoint).get("run_id")
        except ValueError:
            return True  # damaged: reported by validation, not silently ignored
        return run_id == self.run_id or (run_id is None and self.adopted)

    def release(self) -> None:
        """Give up the lock (the end of the run); safe to call twice."""
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def __del__(self) -> None:
        self.release()

    def shared(self) -> dict[str, Any]:
        """What the other ranks need to know (no lock, no notes)."""
        return {"run_id": self.run_id, "adopted": self.adopted}


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The contents of `<run_dir>/run.json`, or None where the folder has none."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is unreadable ({err}); it names the run that owns {run_dir}. Restore it, or "
            "start over with checkpoint.resume = never and job.overwrite = true"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
        raise CheckpointError(f"{path}: no run_id; it is not a distrib run file")
    return doc


def reader(run_dir: Path) -> RunFolder | None:
    """The owner of `run_dir` for a reader (generate, export): no lock is taken, so a run may
    go on training meanwhile. None for a folder written before runs had an identity."""
    doc = read_identity(run_dir)
    if doc is None:
        return None
    return RunFolder(run_dir, doc["run_id"], adopted=bool(doc.get("adopted")))


def _check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"job.run_dir = {run_dir} is a file, not a folder: choose another path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"job.run_dir = {run_dir} cannot be created ({err.strerror}): choose a writable path"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"job.run_dir = {run_dir} is not writable: choose a writable path")


def _lock(run_dir: Path) -> tuple[int | None, str | None]:
    """Take `<run_dir>/.lock`; returns (descriptor, None), or (None, why not) if the file system
    has no locks. Raises ConfigError if another live process holds it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover
        os.close(fd)
        return None, "file locks are not available on this platform"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        os.close(fd)
        raise ConfigError(
            f"job.run_dir = {run_dir} is in use by another run ({holder or 'holder unknown'}): "
            "two runs cannot share a run folder; wait for it to end or choose another job.run_dir"
        ) from None
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None, f"the file system of {run_dir} has no file locks ({err.strerror})"
        raise
    return fd, None


def _name_holder(fd: int) -> None:
    """Say in the lock file who holds it, for the message a second run gets."""
    holder = f"host {socket.gethostname()}, pid {os.getpid()}, since {_now()}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)


def _remove_unfinished_saves(run_dir: Path, notes: list[str]) -> None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for tmp in sorted(folder.glob("step-*.tmp")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        notes.append(f"removed {tmp}: a checkpoint save that never finished (a crash or a kill)")


# What a run writes into its folder. Anything else (the per-rank logs `launch/train.sh` writes
# there before training starts, a user's notes) is not a run's history: it neither makes the
# folder "used" nor moves aside.
RUN_ARTIFACTS = (
    RUN_FILE,
    "checkpoints",
    "metrics.jsonl",
    "config.json",
    "tokenizer.json",
    "tensorboard",
    "wandb",
    "report",
    "reference_logps.npz",
    "chat_template.jinja",
)


def _used(run_dir: Path) -> bool:
    """Whether an earlier run left a history here: an identity, a checkpoint or metrics."""
    checkpoints = run_dir / "checkpoints"
    return (
        (run_dir / RUN_FILE).exists()
        or (run_dir / "metrics.jsonl").exists()
        or (checkpoints.is_dir() and any(checkpoints.glob("step-*")))
    )


def _move_aside(run_dir: Path, old_id: str | None) -> Path:
    """Move the earlier run's files into `previous/<time>-<old id>`; returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir / PREVIOUS / f"{stamp}-{(old_id or 'unnamed')[:8]}"
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.rsplit('.', 1)[0]}.{n}"), n + 1
    dest.mkdir(parents=True)
    for name in RUN_ARTIFACTS:
        if (run_dir / name).exists():
            (run_dir / name).rename(dest / name)
    return dest


def _summary(run_dir: Path, doc: dict[str, Any] | None) -> str:
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    who = (
        f"run {doc['run_id'][:8]} (started {doc.get('created', '?')})" if doc else "an earlier run"
    )
    held = f"checkpoints {', '.join(steps[-3:])}" if steps else "no checkpoint"
    return f"{who}, {held}"


def _inside(path: Path, folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return path.resolve().is_relative_to(folder.resolve())
    return False


def _decide(
    run_dir: Path, resume: str, overwrite: bool, doc: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, bool]:
    """(the identity to continue, or None for a fresh run; whether to move the old run aside)."""
    if resume == "auto":
        continuing = True
    elif resume == "never":
        continuing = False
    else:  # a checkpoint of this folder continues its run; one from elsewhere starts a new one
        continuing = _inside(Path(resume), run_dir / "checkpoints")
    used = _used(run_dir)
    if continuing:
        if doc is not None:
            return doc, False
        if not used:
            return None, False
        # A folder from before runs had an identity: this run adopts what is there.
        return {"run_id": uuid.uuid4().hex, "created": _now(), "adopted": True}, False
    if not used:
        return None, False
    if overwrite:
        return None, True
    start = "checkpoint.resume = never" if resume == "never" else f"checkpoint.resume = {resume}"
    raise ConfigError(
        f"job.run_dir = {run_dir} holds {_summary(run_dir, doc)}; a fresh run ({start}) would mix "
        "with its history. Set checkpoint.resume = auto to continue it, job.overwrite = true to "
        f"move it into {run_dir / PREVIOUS} and start anew, or choose another job.run_dir"
    )


def claim(run_dir: Path, resume: str, overwrite: bool) -> RunFolder:
    """Rank 0, before any other work: lock `run_dir`, clean unfinished saves, and decide which
    run this is (continued or fresh), writing `run.json`. Raises a UserError, with the folder
    left as it was, where the run may not start."""
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    fd, unlocked = _lock(run_dir)
    folder = RunFolder(run_dir, "", _lock=fd)
    try:
        if unlocked:
            folder.notes.append(f"warning: {unlocked}; nothing stops a second run in {run_dir}")
        doc = read_identity(run_dir)
        keep, move = _decide(run_dir, resume, overwrite, doc)
        if move:
            dest = _move_aside(run_dir, doc["run_id"] if doc else None)
            folder.notes.append(f"job.overwrite: moved the earlier run's files to {dest}")
        else:
            _remove_unfinished_saves(run_dir, folder.notes)
        if keep is None:
            keep = {"run_id": uuid.uuid4().hex, "created": _now()}
            if resume not in ("auto", "never"):
                keep["started_from"] = str(Path(resume).resolve())
        folder.run_id, folder.adopted = keep["run_id"], bool(keep.get("adopted"))
        if keep != doc:  # a continued run leaves its file as it is
            tmp = run_dir / (RUN_FILE + ".tmp")
            tmp.write_text(json.dumps(keep, indent=1) + "\n", encoding="utf-8")
            tmp.replace(run_dir / RUN_FILE)
        if fd is not None:
            _name_holder(fd)
    except BaseException:
        folder.release()
        raise
    return folder


def claim_on_every_rank(run_dir: Path, resume: str, overwrite: bool, main: bool) -> RunFolder:
    """`claim` on rank 0 (`main`), its outcome shared with every rank: all ranks get the run's
    identity, or all raise the same error, so no rank is left waiting for a collective."""
    folder: RunFolder | None = None
    outcome: list[Any] = [None]
    if main:
        try:
            folder = claim(run_dir, resume, overwrite)
            outcome[0] = ("ok", folder.shared())
        except UserError as err:
            if not (dist.is_available() and dist.is_initialized()):
                raise
            outcome[0] = ("error", type(err).__name__, str(err))
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        kind = {"CheckpointError": CheckpointError}.get(outcome[0][1], ConfigError)
        raise kind(outcome[0][2])
    return folder or RunFolder(Path(run_dir), **outcome[0][1])
