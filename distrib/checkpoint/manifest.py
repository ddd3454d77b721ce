"""What a complete checkpoint holds, written last: its files with sizes and SHA-256 checksums,
the step, the layout and the config. A checkpoint without `manifest.json` never finished; one
whose files disagree with it was damaged after the fact (truncated, deleted, overwritten).

Hashing is split over the ranks (each hashes every N-th file) so that a large checkpoint is
checked in 1/N of the time one process would take.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def data_files(folder: Path) -> list[str]:
    """Every file under `folder` except the manifest, as sorted relative paths."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def hash_files(folder: Path, names: list[str], collective: bool = True) -> dict[str, str]:
    """{name: sha256} for `names` under `folder`; with `collective` every rank must call this
    with the same names and each hashes its share. Unreadable files map to ''."""
    rank, world = (
        (dist.get_rank(), dist.get_world_size()) if collective and _distributed() else (0, 1)
    )
    mine: dict[str, str] = {}
    for name in names[rank::world]:
        try:
            mine[name] = sha256(folder / name)
        except OSError:
            mine[name] = ""
    if world == 1:
        return mine
    shares: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in (share or {}).items()}


def write(folder: Path, digests: dict[str, str], info: dict[str, Any]) -> None:
    """Write the manifest of `folder` (rank 0, after every file is written)."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": digest}
        for name, digest in sorted(digests.items())
    }
    doc = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
        "files": files,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(folder / MANIFEST)


def read(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`; raises ValueError if it is missing or unreadable."""
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / MANIFEST}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise ValueError(f"{folder / MANIFEST}: not a distrib checkpoint manifest")
    return doc


def problems(folder: Path, checksums: bool, collective: bool = True) -> list[str]:
    """What is wrong with the checkpoint `folder` ([] when it is intact): a missing or unreadable
    manifest, missing files, wrong sizes, and (with `checksums`) wrong contents."""
    try:
        files = read(folder)["files"]
    except ValueError as err:
        return [str(err)]
    found: list[str] = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            found.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['size']}")
    if checksums and not found:
        digests = hash_files(folder, sorted(files), collective)
        found += [
            f"{name}: checksum mismatch"
            for name in sorted(files)
            if digests[name] != files[name]["sha256"]
        ]
    return found
