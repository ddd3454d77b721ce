"""Pre-tokenized memmap shards with a manifest (hashes, counts).

A prepared dataset is a folder holding `train-00000.bin`, ..., `val-00000.bin` (raw little-endian
token ids, EOS after every document), `tokenizer.json` and `manifest.json`. The manifest is written
last and the folder is renamed into place only when complete (`atomic_dir`), so a folder with a
manifest is a whole dataset.

Integrity is checked at two costs. Every shard record holds the sha256 of the whole file and a
"spot" digest: the sha256 of `SPOT_BLOCKS` blocks of `SPOT_BLOCK_BYTES` at evenly spaced offsets
(the first and the last block included; a small shard is hashed whole). Opening a split checks
sizes and spot digests, which reads at most 32 KiB per shard whatever its size; `distrib prepare
--verify` reads everything and checks the full sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from distrib.errors import DataError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_TOKENS = 64 * 2**20
SPOT_BLOCKS = 8
SPOT_BLOCK_BYTES = 4096
# Shards checked at once: file reads and hashlib release the GIL, and on network file systems
# the latency of many small reads, not bandwidth, is what a serial check would wait for.
CHECK_THREADS = 16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def spot_digest(
    path: str | Path, blocks: int = SPOT_BLOCKS, block_bytes: int = SPOT_BLOCK_BYTES
) -> str:
    """sha256 over `blocks` blocks of `block_bytes` at evenly spaced offsets, from the first block
    to the last; a file of at most blocks x block_bytes bytes is hashed whole. It catches a
    truncated-and-padded, zero-filled or swapped shard at a cost that does not grow with its
    size; a flipped byte between the blocks is left to the full sha256."""
    if blocks < 2:
        raise ValueError(f"a spot digest needs at least 2 blocks, got {blocks}")
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= blocks * block_bytes:
            digest.update(f.read())
            return digest.hexdigest()
        for i in range(blocks):
            f.seek(i * (size - block_bytes) // (blocks - 1))
            digest.update(f.read(block_bytes))
    return digest.hexdigest()


def full_digest(path: str | Path) -> str:
    """sha256 of the whole file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_problem(
    dir: Path, record: dict[str, Any], itemsize: int, spot: dict[str, int] | None, full: bool
) -> str | None:
    """What is wrong with one shard, as `<path>: <what>`, or None: missing, a size that is not the
    manifest's, then a digest that differs (the full sha256 if `full`, else the spot digest when
    the manifest has one; manifests written before spot digests get sizes only)."""
    path = dir / record["file"]
    if not path.is_file():
        return f"{path}: shard missing"
    expected = record["num_tokens"] * itemsize
    size = path.stat().st_size
    if size != expected:
        return f"{path}: {size} bytes, the manifest says {expected} ({record['num_tokens']} tokens)"
    if full:
        digest = full_digest(path)
        if digest != record["sha256"]:
            return f"{path}: sha256 {digest} does not match the manifest ({record['sha256']})"
        return None
    if spot is None or "spot_sha256" not in record:  # written before spot digests
        return None
    if spot_digest(path, spot["blocks"], spot["block_bytes"]) != record["spot_sha256"]:
        return f"{path}: bytes changed in place (its spot digest differs from the manifest's)"
    return None


def find_damage(
    dir: Path,
    records: Sequence[dict[str, Any]],
    itemsize: int,
    spot: dict[str, int] | None,
    full: bool = False,
    threads: int = CHECK_THREADS,
) -> list[str]:
    """`shard_problem` of every shard, in threads; the problems found, in shard order."""

    def check(record: dict[str, Any]) -> str | None:
        return shard_problem(dir, record, itemsize, spot, full)

    if len(records) <= 4 or threads <= 1:
        found = [check(r) for r in records]
    else:
        with ThreadPoolExecutor(min(threads, len(records))) as pool:
            found = list(pool.map(check, records))
    return [p for p in found if p is not None]


def damage_error(dir: Path, problems: list[str], limit: int = 10) -> DataError:
    """The DataError of a damaged dataset at open: the shards (up to `limit`) and what to do."""
    listed = "; ".join(problems[:limit])
    if len(problems) > limit:
        listed += f"; and {len(problems) - limit} more"
    return DataError(
        f"damaged dataset {dir}: {listed}. `distrib prepare --verify` checks every shard in "
        "full without changing anything; `distrib prepare --force` rebuilds the dataset"
    )


class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin` files of at most `max_shard_tokens` each."""

    def __init__(
        self,
        dir: str | Path,
        split: str,
        dtype: np.dtype | str,
        eos_id: int,
        max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ) -> None:
        if max_shard_tokens <= 0:
            raise ValueError(f"max_shard_tokens must be positive, got {max_shard_tokens}")
        self.dir = Path(dir)
        self.split = split
        # Little-endian on disk whatever the host, so shards move between machines.
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eos_id = eos_id
        self.max_shard_tokens = max_shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._hash: Any = None
        self._count = 0
        self._docs = 0

    def append(self, tokens: np.ndarray) -> None:
        """Append token ids (documents already end in EOS); spills into new shards as needed."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise DataError(f"token ids out of range for {self.dtype.name} in split {self.split}")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None:
                self._open_next()
            take = min(tokens.size, self.max_shard_tokens - self._count)
            chunk, tokens = tokens[:take], tokens[take:]
            data = chunk.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            self._docs += int(np.count_nonzero(chunk == self.eos_id))
            if self._count == self.max_shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        """Flush the last shard; returns the shard records for the manifest."""
        if self._file is not None:
            self._finish()
        return self.shards

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.dir / name, "wb")  # noqa: SIM115 - closed in _finish
        self._hash = hashlib.sha256()
        self._count = self._docs = 0

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = Path(self._file.name)
        self.shards.append(
            {
                "file": path.name,
                "num_tokens": self._count,
                "num_documents": self._docs,
                "sha256": self._hash.hexdigest(),
                # Read back from the file just written (32 KiB at most, from the page cache).
                "spot_sha256": spot_digest(path),
            }
        )
        self._file = None


def split_record(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest entry of one split: its shards and their totals."""
    return {
        "shards": shards,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
    }


def write_manifest(dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json (via a temporary file, so it is never seen half-written)."""
    path = Path(dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_manifest(
    dtype: np.dtype,
    vocab_size: int,
    eos_id: int,
    splits: dict[str, list[dict[str, Any]]],
    **extra: Any,
) -> dict[str, Any]:
    """The manifest of a dataset whose splits hold `splits` (shard records from ShardWriter)."""
    records = {name: split_record(shards) for name, shards in splits.items()}
    return {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "splits": records,
        "spot_check": {"blocks": SPOT_BLOCKS, "block_bytes": SPOT_BLOCK_BYTES},
        "num_tokens": sum(r["num_tokens"] for r in records.values()),
        "num_documents": sum(r["num_documents"] for r in records.values()),
        **extra,
    }


def write_token_dataset(
    dir: str | Path,
    tokens: dict[str, np.ndarray],
    vocab_size: int,
    eos_id: int,
    max_shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> Path:
    """Write ready token streams (one per split) as a dataset; for tests and synthetic data."""
    dtype = token_dtype(vocab_size)
    with atomic_dir(dir) as tmp:
        splits = {}
        for split, stream in tokens.items():
            writer = ShardWriter(tmp, split, dtype, eos_id, max_shard_tokens)
            writer.append(stream)
            splits[split] = writer.close()
        write_manifest(tmp, make_manifest(dtype, vocab_size, eos_id, splits, source="arrays"))
    return Path(dir)


# `<name>.tmp-<host>-<pid>` and `<name>.old-<host>-<pid>`, or `<name>.tmp-<pid>` (before the host
# was part of the name): the working folders of `atomic_dir`, left behind by a killed process.
WORK_DIR = re.compile(r"\.(?P<kind>tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def host_name() -> str:
    """This machine's name as it appears in working folder names."""
    return re.sub(r"[^\w.-]", "_", socket.gethostname()) or "localhost"


def work_dir(final: Path, kind: str) -> Path:
    """`<final>.<kind>-<host>-<pid>`: the host and pid tell, after a crash, whose folder it is."""
    return final.with_name(f"{final.name}.{kind}-{host_name()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh `<final>.tmp-<host>-<pid>` folder; on success it replaces `final`, on error
    it goes.

    An existing `final` is moved aside only once the new folder is complete, so a crash leaves
    either the old dataset or none, never a partial one that looks complete.
    """
    final = Path(final)
    tmp = work_dir(final, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = work_dir(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(dir: str | Path) -> dict[str, Any]:
    """The manifest of the dataset in `dir`; DataError if there is none or it cannot be read."""
    dir = Path(dir)
    path = dir / MANIFEST_FILE
    if not path.is_file():
        what = "no manifest.json in" if dir.is_dir() else "no prepared dataset at"
        raise DataError(f"{what} {dir}: run `distrib prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}); run `distrib prepare`") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {version}, this code reads {FORMAT_VERSION}; "
            "run `distrib prepare` again"
        )
    return manifest


class TokenShards:
    """One split of a prepared dataset: a read-only token stream over memmapped shards."""

    def __init__(self, dir: Path, split: str, manifest: dict[str, Any]) -> None:
        self.dir = dir
        self.split = split
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.eos_id: int = manifest["eos_id"]
        self.vocab_size: int = manifest["vocab_size"]
        self.shards: list[dict[str, Any]] = manifest["splits"][split]["shards"]
        self.num_documents: int = manifest["splits"][split]["num_documents"]
        sizes = [s["num_tokens"] for s in self.shards]
        # offsets[i] = first global token index of shard i; offsets[-1] = num_tokens.
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        problems = find_damage(dir, self.shards, self.dtype.itemsize, manifest.get("spot_check"))
        if problems:
            raise damage_error(dir, problems)
        self._maps = [
            np.memmap(dir / s["file"], dtype=self.dtype, mode="r", shape=(s["num_tokens"],))
            for s in self.shards
        ]

    @classmethod
    def open(cls, dir: str | Path, split: str) -> TokenShards:
        """Open `split` of the dataset in `dir`; checks the sizes and spot digests of its shards
        (at most 32 KiB read per shard), not the full hashes (`verify`)."""
        dir = Path(dir)
        manifest = read_manifest(dir)
        if split not in manifest["splits"]:
            raise DataError(
                f"{dir / MANIFEST_FILE}: no split '{split}'; has {sorted(manifest['splits'])}"
            )
        return cls(dir, split, manifest)

    @property
    def num_tokens(self) -> int:
        """Tokens in this split."""
        return int(self._offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.num_tokens} tokens of "
                f"split {self.split}"
            )
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        lo = start - int(self._offsets[i])
        if lo + length <= len(self._maps[i]):  # the common case: one shard, one slice
            return np.array(self._maps[i][lo : lo + length])
        out = np.empty(length, dtype=self.dtype)
        done = 0
        while done < length:
            part = self._maps[i][lo : lo + length - done]
            out[done : done + len(part)] = part
            done += len(part)
            i, lo = i + 1, 0
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of `length` tokens starting at each of `starts`: shape [len(starts), length]."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        for row, start in enumerate(starts.tolist()):
            out[row] = self.window(start, length)
        return out

    def locate(self, index: int) -> tuple[Path, int]:
        """The shard file holding token `index` of the split's stream, and its offset there."""
        i = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.dir / self.shards[i]["file"], index - int(self._offsets[i])

    def verify(self) -> None:
        """Recompute every shard's size and sha256 against the manifest; DataError on mismatch."""
        problems = find_damage(self.dir, self.shards, self.dtype.itemsize, None, full=True)
        if problems:
            raise damage_error(self.dir, problems)
