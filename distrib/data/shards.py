"""Pre-tokenized memmap shards with a manifest (hashes, counts).

A prepared dataset is a folder holding `train-00000.bin`, ..., `val-00000.bin` (raw little-endian
token ids, EOS after every document), `tokenizer.json` and `manifest.json`. The manifest is written
last and the folder is renamed into place only when complete (`atomic_dir`), so a folder with a
manifest is a whole dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distrib.errors import DataError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_TOKENS = 64 * 2**20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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
        self.shards.append(
            {
                "file": Path(self._file.name).name,
                "num_tokens": self._count,
                "num_documents": self._docs,
                "sha256": self._hash.hexdigest(),
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


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh `<final>.tmp-<pid>` folder; on success it replaces `final`, on error it goes.

    An existing `final` is moved aside only once the new folder is complete, so a crash leaves
    either the old dataset or none, never a partial one that looks complete.
    """
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


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
        self._check_sizes()
        self._maps = [
            np.memmap(dir / s["file"], dtype=self.dtype, mode="r", shape=(s["num_tokens"],))
            for s in self.shards
        ]

    @classmethod
    def open(cls, dir: str | Path, split: str) -> TokenShards:
        """Open `split` of the dataset in `dir`; checks file sizes (cheap), not hashes."""
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
        if split not in manifest["splits"]:
            raise DataError(f"{path}: no split '{split}'; has {sorted(manifest['splits'])}")
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

    def verify(self) -> None:
        """Recompute every shard's size and sha256 against the manifest; DataError on mismatch."""
        self._check_sizes()
        for s in self.shards:
            path = self.dir / s["file"]
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != s["sha256"]:
                raise DataError(
                    f"{path}: sha256 {digest} does not match the manifest ({s['sha256']}); "
                    "the shard is corrupt: run `distrib prepare` again"
                )

    def _check_sizes(self) -> None:
        for s in self.shards:
            path = self.dir / s["file"]
            expected = s["num_tokens"] * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"{path}: shard missing; run `distrib prepare` again")
            size = path.stat().st_size
            if size != expected:
                raise DataError(
                    f"{path}: {size} bytes, the manifest says {expected} "
                    f"({s['num_tokens']} tokens); run `distrib prepare` again"
                )
