"""Batches of chat and preference datasets, sharded by data-parallel rank, with exact resume.

A sample is one row of a batch:
- chat, packing = pack: consecutive examples (in stored order, which `distrib prepare` shuffled)
  packed greedily into rows of at most seq_len inputs; `doc_ids` tell the examples apart.
- chat, packing = pad: one example per row.
- preference: one pair; a micro-batch of b pairs has 2b rows, the chosen sequences then the
  rejected ones in the same pair order.
An example of n tokens gives inputs x[:-1] and labels x[1:], a label being IGNORE_INDEX where it
is no target; rows are padded to seq_len with EOS inputs and IGNORE_INDEX labels.

Samples are ordered like `TokenLoader`'s: each epoch permutes them with `default_rng([seed,
epoch])`, global batch i is perm[i*G : (i+1)*G] and data-parallel rank r takes the r-th
contiguous 1/dp of it, so a global batch holds the same samples whatever the layout.

Chat micro-batches carry `loss_denominator` = (labels counted in the whole global batch) x
micro / global batch, from the stored per-example counts: the loss sum of each micro-batch over
it, summed over the step's micro-batches and ranks and divided by their number (what gradient
accumulation and data-parallel averaging do), is the mean over every label of the global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.config import DataConfig, TrainingConfig
from distrib.data.loader import Batch, SampleOrder, pinned
from distrib.data.shards import TokenShards, damage_error, full_digest
from distrib.errors import DataError
from distrib.models.loss import IGNORE_INDEX

KINDS = ("chat", "preference")


def index_file(split: str) -> str:
    """The name of a split's index: each sequence's length and label targets."""
    return f"{split}-index.npy"


def index_problem(dir: Path, info: dict[str, Any]) -> str | None:
    """What is wrong with a split's index file (missing, other bytes), as `<path>: <what>`."""
    path = dir / info["index"]
    if not path.is_file():
        return f"{path}: index missing"
    if full_digest(path) != info["index_sha256"]:  # a few bytes a sequence: hashed whole
        return f"{path}: sha256 does not match the manifest"
    return None


class ExampleShards(TokenShards):
    """One split of a chat or preference dataset: the token stream (this TokenShards), the
    target mask stream (`masks`) and each sequence's length and label targets."""

    def __init__(self, dir: Path, split: str, manifest: dict[str, Any]) -> None:
        kind = manifest.get("kind", "text")
        if kind not in KINDS:
            raise DataError(f"{dir} holds a {kind} dataset, not chat or preference examples")
        super().__init__(dir, split, manifest)
        self.kind: str = kind
        self.masks = TokenShards(dir, f"{split}_mask", manifest)
        info = manifest["examples"][split]
        problem = index_problem(dir, info)
        if problem is not None:
            raise damage_error(dir, [problem])
        index = np.load(dir / info["index"], allow_pickle=False)
        self.lengths: np.ndarray = index[:, 0]
        self.targets: np.ndarray = index[:, 1]  # targets among each sequence's labels
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])  # [sequences + 1]
        if self.starts[-1] != self.num_tokens or self.masks.num_tokens != self.num_tokens:
            raise damage_error(dir, [f"split {split}: index, token and mask streams do not add up"])
        self.num_examples = len(self.lengths) // (1 if kind == "chat" else 2)


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Row boundaries [rows + 1] of examples of `lengths` tokens (seq_len + 1 at most) packed
    greedily in order into rows of at most seq_len inputs (an example of n tokens has n - 1)."""
    bounds = [0]
    used = 0
    for i, n in enumerate((lengths - 1).tolist()):
        if used + n > seq_len:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths) > bounds[-1]:
        bounds.append(len(lengths))
    return np.array(bounds, dtype=np.int64)


def chat_rows(shards: ExampleShards, seq_len: int, packing: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a chat split: boundaries [rows + 1] in its examples (`pack_rows`, or one
    example a row), and each row's counted labels, which loss_denominator is made of without
    reading any row."""
    n = len(shards.lengths)
    rows = pack_rows(shards.lengths, seq_len) if packing == "pack" else np.arange(n + 1)
    targets = np.add.reduceat(shards.targets, rows[:-1]) if n else np.zeros(0, np.int64)
    return rows, targets


def _too_small(split: str, what: str, samples: int, needed: int) -> DataError:
    more = "raise data.val_fraction, " if split == "val" else ""
    return DataError(
        f"split '{split}' has {samples} {what}, but one global batch needs {needed}; lower "
        f"training.global_batch_size, {more}or use more records"
    )


class ExampleLoader(SampleOrder):
    """Deterministic, resumable batches of one split of a chat or preference dataset for
    data-parallel rank `dp_rank`; the interface of `TokenLoader`."""

    ORDER_KEYS = (
        "the dataset, data.seq_len, data.packing, training.global_batch_size or training.seed"
    )

    def __init__(
        self,
        shards: ExampleShards,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        packing: str = "pack",
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            seq_len,
            global_batch_size,
            micro_batch_size,
            dp_rank,
            dp_size,
            seed,
            shuffle,
            pin_memory,
        )
        if packing not in ("pack", "pad"):
            raise ValueError(f"unknown packing '{packing}': valid pack, pad")
        self.shards = shards
        self.kind = shards.kind
        self.packing = packing if self.kind == "chat" else "pad"  # pairs are always padded
        longest = int(shards.lengths.max(initial=1)) - 1
        if longest > seq_len:
            raise DataError(
                f"split '{shards.split}' of {shards.dir} holds sequences of {longest + 1} tokens, "
                f"more than data.seq_len + 1 = {seq_len + 1}: prepare it again with this seq_len"
            )
        if self.kind == "chat":
            self._rows, self._row_targets = chat_rows(shards, seq_len, self.packing)
            self.num_samples = len(self._rows) - 1
        else:
            self.num_samples = shards.num_examples
        if self.num_samples < global_batch_size:
            what = "pairs" if self.kind == "preference" else f"rows ({self.packing})"
            raise _too_small(shards.split, what, self.num_samples, global_batch_size)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the loader."""
        samples = self.global_batch_samples()
        denominator = None
        if self.kind == "chat":
            counted = int(self._row_targets[samples].sum())
            denominator = max(counted, 1) * self.micro_batch_size / self.global_batch_size
        mine = self.rank_samples(samples)
        batches = [
            self.batch_of(mine[i : i + self.micro_batch_size], denominator)
            for i in range(0, len(mine), self.micro_batch_size)
        ]
        self.advance()
        return batches

    def batch_of(self, samples: np.ndarray, loss_denominator: float | None = None) -> Batch:
        """The micro-batch of the given sample ids (rows, or pairs: chosen rows then rejected
        rows), whatever the loader's position, which it leaves as it is."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.kind == "chat":
            ranges = [(int(self._rows[s]), int(self._rows[s + 1])) for s in samples]
        else:
            ranges = [(2 * int(p), 2 * int(p) + 1) for p in samples]
            ranges += [(a + 1, b + 1) for a, b in ranges]
        inputs, labels, doc_ids = self._rows_of(ranges, samples)
        tensors = [torch.from_numpy(inputs), torch.from_numpy(labels)]
        # Packed examples are kept apart by the document mask alone: positions run on across
        # them, which is harmless since RoPE under that mask only sees offsets within an example.
        if self.packing == "pack":
            tensors.append(torch.from_numpy(doc_ids))
        if self.pin_memory:
            tensors = [pinned(t) for t in tensors]
        ids = tensors[2] if len(tensors) == 3 else None
        return Batch(tensors[0], tensors[1], ids, torch.from_numpy(samples), loss_denominator)

    def _rows_of(
        self, ranges: list[tuple[int, int]], samples: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, labels and doc ids [rows, seq_len] of rows holding sequences [a, b) each."""
        shards, L = self.shards, self.seq_len
        inputs = np.full((len(ranges), L), shards.eos_id, dtype=np.int64)
        labels = np.full((len(ranges), L), IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.empty((len(ranges), L), dtype=np.int64)
        for row, (a, b) in enumerate(ranges):
            lo, hi = int(shards.starts[a]), int(shards.starts[b])
            # A row's sequences are contiguous in the stream: one read each for tokens and mask.
            ids = shards.window(lo, hi - lo).astype(np.int64)
            mask = shards.masks.window(lo, hi - lo).astype(bool)
            if ids.size and int(ids.max()) >= shards.vocab_size:
                raise self._out_of_vocab(lo, ids, samples[row % len(samples)])
            doc_ids[row] = b - a  # the padding: an id of its own after the row's examples
            col = 0
            for k, s in enumerate(range(a, b)):
                start, n = int(shards.starts[s]) - lo, int(shards.lengths[s])
                x, target = ids[start : start + n], mask[start : start + n]
                inputs[row, col : col + n - 1] = x[:-1]
                labels[row, col : col + n - 1] = np.where(target[1:], x[1:], IGNORE_INDEX)
                doc_ids[row, col : col + n - 1] = k
                col += n - 1
        return inputs, labels, doc_ids

    def _out_of_vocab(self, lo: int, ids: np.ndarray, sample: int) -> DataError:
        """The error naming the first token of `ids` (read at `lo`) outside the vocabulary."""
        vocab = self.shards.vocab_size
        i = int(np.argmax(ids >= vocab))
        path, offset = self.shards.locate(lo + i)
        return DataError(
            f"token id {int(ids[i])} at token {offset} of {path} (split '{self.shards.split}', "
            f"sample {sample}) is not below the vocabulary size {vocab} of the manifest: the "
            "shard is damaged or does not belong to this dataset; `distrib prepare --verify` "
            "checks every shard"
        )


def build_example_loaders(
    data: DataConfig,
    training: TrainingConfig,
    dp_rank: int,
    dp_size: int,
    pin_memory: bool = False,
    train_shards: TokenShards | None = None,
) -> tuple[ExampleLoader, ExampleLoader]:
    """The train loader and the (unshuffled) val loader of the chat or preference dataset in
    `data.dir`; val sized like `build_loaders` does (the training global batch when the split
    holds one, else the most samples it holds in multiples of micro batch x dp)."""
    common: dict[str, Any] = {
        "seq_len": data.seq_len,
        "micro_batch_size": training.micro_batch_size,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "seed": training.seed,
        "packing": data.packing,
        "pin_memory": pin_memory,
    }
    if not isinstance(train_shards, ExampleShards):
        train_shards = ExampleShards.open(data.dir, "train")
    train = ExampleLoader(
        train_shards,
        global_batch_size=training.global_batch_size,
        **common,
    )
    val_shards = ExampleShards.open(data.dir, "val")
    per_step = training.micro_batch_size * dp_size
    # Counted by a loader with a batch of one step, which checks the split as well.
    probe = ExampleLoader(val_shards, global_batch_size=per_step, shuffle=False, **common)
    val_batch = min(training.global_batch_size, probe.num_samples // per_step * per_step)
    val = ExampleLoader(val_shards, global_batch_size=val_batch, shuffle=False, **common)
    return train, val
