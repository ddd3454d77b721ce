"""Tokenizing a corpus in parts: with every core, across machines, and resumable.

Each split's documents, in the order they are written (train shuffled by the seed, val in corpus
order), are cut into parts of consecutive documents; the cut depends only on the number of
documents. A part is tokenized into one file of `<final>.parts-<recipe hash>/`, written under a
temporary name and renamed, then marked done by a small JSON record (its token count and
sha256). The dataset is made by streaming the parts, in order, into the shard writer, so it is
byte for byte the same whichever processes or machines tokenized which parts, and the same as a
single process writes. Parts already done are skipped: an interrupted preparation resumes where
it stopped, and the parts of a preparation split over tasks (a Slurm array: `distrib prepare
--task I --tasks N` on each, then `distrib prepare` once to merge) are found by the merge.

The parts folder is named after the recipe, so parts of another recipe are never mixed in, and
removed once the dataset is in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from distrib.config import DataConfig
from distrib.data.sources import Corpus
from distrib.data.tokenizer import TOKENIZER_FILE, Tokenizer

MIN_PART_DOCUMENTS = 64  # below this a part's bookkeeping outweighs its work
MAX_PARTS = 4096  # per split: bigger corpora get bigger parts, not more files
MERGE_CHUNK_TOKENS = 16 * 2**20  # the merge streams each part in pieces of this many tokens
# Fewer documents than this are tokenized in this process: starting worker processes (each
# imports the library and reads the corpus) would take longer than the work.
PARALLEL_MIN_DOCUMENTS = 2000


def part_size(num_documents: int) -> int:
    """Documents per part of a split of `num_documents`."""
    return max(MIN_PART_DOCUMENTS, math.ceil(num_documents / MAX_PARTS))


@dataclass(frozen=True)
class Part:
    """Part `index` of `split`: the positions (in the split's written order) of its documents."""

    split: str
    index: int
    number: int  # across splits: what `--task I --tasks N` deals out (number % N == I)
    positions: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def plan(corpus: Corpus, seed: int) -> list[Part]:
    """Every part of every split, train first, in writing order."""
    parts: list[Part] = []
    for split in ("train", "val"):
        n = len(corpus.ids(split))
        order = np.random.default_rng(seed).permutation(n) if split == "train" else np.arange(n)
        size = part_size(n)
        for index, start in enumerate(range(0, n, size)):
            parts.append(Part(split, index, len(parts), order[start : start + size]))
    return parts


class PartsFolder:
    """`<final>.parts-<hash of the recipe>/`: the shared tokenizer and the tokenized parts."""

    def __init__(self, final: Path, recipe: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = final.with_name(f"{final.name}.parts-{digest}")

    def tokenizer(self) -> Tokenizer | None:
        path = self.dir / TOKENIZER_FILE
        return Tokenizer.load(path) if path.is_file() else None

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{TOKENIZER_FILE}.tmp-{os.getpid()}"
        tokenizer.save(tmp)
        os.replace(tmp, self.dir / TOKENIZER_FILE)

    def record(self, part: Part) -> dict[str, Any] | None:
        """The done record of `part`, or None if it is not (completely) written."""
        try:
            doc = json.loads((self.dir / f"{part.name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        path = self.dir / f"{part.name}.bin"
        ok = path.is_file() and path.stat().st_size == doc["num_tokens"] * doc["itemsize"]
        return doc if ok else None

    def tokens(self, part: Part, dtype: np.dtype) -> np.ndarray:
        record = self.record(part)
        assert record is not None, part.name
        if record["num_tokens"] == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(self.dir / f"{part.name}.bin", dtype=dtype, mode="r")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PartWriter:
    """The `writer` of `write_split` for one part: one file, marked done on `close`."""

    def __init__(self, folder: PartsFolder, part: Part, dtype: np.dtype) -> None:
        self.folder, self.part = folder, part
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tmp = folder.dir / f"{part.name}.bin.tmp-{os.getpid()}"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._hash = hashlib.sha256()
        self.num_tokens = 0

    def append(self, tokens: np.ndarray) -> None:
        data = np.asarray(tokens).astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += len(tokens)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.part.name
        os.replace(self.tmp, self.folder.dir / f"{name}.bin")
        doc = {
            "num_tokens": self.num_tokens,
            "itemsize": self.dtype.itemsize,
            "sha256": self._hash.hexdigest(),
        }
        tmp = self.folder.dir / f"{name}.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder.dir / f"{name}.json")  # last: the part is done


def tokenize_part(
    corpus: Corpus, tokenizer: Tokenizer, folder: PartsFolder, part: Part, dtype: np.dtype
) -> None:
    """Tokenize one part into its file (EOS after every document)."""
    from distrib.data import prepare  # the module attribute: tests replace write_split

    writer = PartWriter(folder, part, dtype)
    try:
        prepare.write_split(corpus, part.split, tokenizer, writer, part.positions)
    except BaseException:
        writer._file.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    writer.close()


# ---- worker processes ----------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _start_worker(data: dict[str, Any], folder: str, dtype: str) -> None:
    # Each process tokenizes one batch at a time on one core; the tokenizers library's own
    # threads would only compete with the other processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from distrib.data.sources import load_corpus

    cfg = DataConfig(**data)
    parts = PartsFolder.__new__(PartsFolder)
    parts.dir = Path(folder)
    tokenizer = parts.tokenizer()
    assert tokenizer is not None
    _worker.update(
        corpus=load_corpus(cfg), tokenizer=tokenizer, folder=parts, dtype=np.dtype(dtype)
    )


def _work(part: Part) -> str:
    w = _worker
    tokenize_part(w["corpus"], w["tokenizer"], w["folder"], part, w["dtype"])
    return part.name


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenize_parts(
    cfg: DataConfig,
    corpus: Corpus,
    tokenizer: Tokenizer,
    folder: PartsFolder,
    todo: list[Part],
    dtype: np.dtype,
    num_proc: int,
    log: Callable[[str], None],
) -> None:
    """Tokenize the parts `todo`: here with the tokenizer's threads (`num_proc` 1), or in
    `num_proc` processes (0: one per available core)."""
    folder.dir.mkdir(parents=True, exist_ok=True)
    procs = min(num_proc or available_cores(), len(todo))
    if procs <= 1 or sum(len(p.positions) for p in todo) < PARALLEL_MIN_DOCUMENTS:
        for part in todo:
            tokenize_part(corpus, tokenizer, folder, part, dtype)
        return
    # spawn, not fork: a forked copy of the tokenizers library's thread pool can deadlock.
    context = get_context("spawn")
    data = asdict(cfg)
    with ProcessPoolExecutor(
        procs,
        mp_context=context,
        initializer=_start_worker,
        initargs=(data, str(folder.dir), dtype.name),
    ) as pool:
        for _ in pool.map(_work, todo):
            pass
