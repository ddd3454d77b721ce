"""`distrib prepare --verify`, and the working folders that interrupted preparations leave.

The full check reads every byte once (sha256 of each shard, shards hashed in parallel threads)
and changes nothing. Leftover folders `<name>.tmp-<host>-<pid>` (see `atomic_dir`) next to a
dataset are removed by the next `prepare` when they come from this host and their process is
gone; any other is only reported, since it may belong to a preparation still running elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrib.data.shards import MANIFEST_FILE, WORK_DIR, find_damage, host_name, read_manifest
from distrib.errors import DataError


def verify_dataset(dir: str | Path, log: Callable[[str], None] = print) -> None:
    """Size and full sha256 of every shard of every split against the manifest, logged as one
    line; DataError naming every damaged shard. Reads the whole dataset, writes nothing."""
    dir = Path(dir)
    report_leftovers(dir, log)
    manifest = read_manifest(dir)
    records = [r for split in manifest["splits"].values() for r in split["shards"]]
    itemsize = np.dtype(manifest["dtype"]).itemsize
    start = time.perf_counter()
    problems = find_damage(dir, records, itemsize, None, full=True, threads=os.cpu_count() or 1)
    if problems:  # one line, like every error of the CLI
        raise DataError(
            f"{dir}: {len(problems)} of {len(records)} shards damaged: {'; '.join(problems)}. "
            "Nothing was changed; `distrib prepare --force` rebuilds the dataset"
        )
    size = sum(r["num_tokens"] for r in records) * itemsize
    log(
        f"verified {dir}: {len(records)} shards, {size / 1e9:.2f} GB, every sha256 matches "
        f"the manifest ({time.perf_counter() - start:.1f} s)"
    )


@dataclass
class Leftover:
    """A working folder of `atomic_dir` found next to a dataset."""

    path: Path
    host: str | None  # None: the older `<name>.tmp-<pid>` naming, which did not record it
    pid: int


def find_leftovers(final: str | Path) -> list[Leftover]:
    """The working folders of interrupted preparations of the dataset `final`, by name."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    found = []
    for path in sorted(final.parent.iterdir()):  # not glob: the name may hold [ or *
        match = WORK_DIR.fullmatch(path.name[len(final.name) :])
        if path.name.startswith(final.name) and match and path.is_dir():
            found.append(Leftover(path, match["host"], int(match["pid"])))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 checks without sending one)."""
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:
        return False
    return True


def _keep_reason(leftover: Leftover, final: Path) -> str | None:
    """Why `leftover` must not be removed, or None when it is safe to."""
    if not final.exists() and (leftover.path / MANIFEST_FILE).is_file():
        # Killed between the two renames of atomic_dir: this may be the only complete copy.
        return f"a complete dataset: `mv {leftover.path} {final}` restores it"
    if leftover.host is None:
        return "older naming without the host: remove it once no `distrib prepare` runs"
    if leftover.host != host_name():
        return f"from host {leftover.host}"
    if pid_alive(leftover.pid):
        return f"pid {leftover.pid} still runs on this host"
    return None


def tidy_leftovers(
    final: str | Path, log: Callable[[str], None] = print, remove: bool = True
) -> list[Path]:
    """Remove (if `remove`) the leftovers of `final` from this host whose process is gone, and
    log them in one line; log the others in one more line without touching them. Returns the
    removed folders."""
    final = Path(final)
    removed, kept = [], []
    for leftover in find_leftovers(final):
        reason = _keep_reason(leftover, final)
        if reason is None and remove:
            shutil.rmtree(leftover.path, ignore_errors=True)
            removed.append(leftover.path)
        else:
            kept.append(f"{leftover.path.name} ({reason or 'its process is gone'})")
    if removed:
        names = ", ".join(p.name for p in removed)
        log(
            f"removed {len(removed)} folder(s) left by interrupted preparations of {final}: {names}"
        )
    if kept:
        log(f"left as they are next to {final}: {'; '.join(kept)}")
    return removed


def report_leftovers(final: str | Path, log: Callable[[str], None] = print) -> None:
    """Log the leftovers of `final`, removing nothing (for `--verify` and training)."""
    tidy_leftovers(final, log, remove=False)
