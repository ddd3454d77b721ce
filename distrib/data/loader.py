"""Packed token batches, sharded by data-parallel rank, with exact resume.

Sample j of a split is the window of seq_len + 1 tokens starting at j * seq_len of its token
stream (consecutive windows share one token, so every token is a label exactly once). Each epoch
permutes the samples with `default_rng([seed, epoch])`; global batch i is the slice
perm[i*G : (i+1)*G] and data-parallel rank r takes the r-th contiguous 1/dp of it. A global batch
therefore holds the same sequences whatever the data-parallel degree, and the loader state (epoch,
batch index) does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distrib.config import DataConfig, TrainingConfig
from distrib.config.rules import accumulation_steps
from distrib.data.shards import TokenShards, read_manifest
from distrib.errors import DataError

if TYPE_CHECKING:  # it imports this module
    from distrib.data.example_loader import ExampleLoader


@dataclass
class Batch:
    """One micro-batch: next-token targets and, when asked, per-token document ids."""

    inputs: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # int64 [B, L]: inputs shifted left by one
    doc_ids: torch.Tensor | None = None  # int64 [B, L]: document index of each input token
    sample_ids: torch.Tensor | None = None  # int64 [B]: position of each sequence in the split
    # The loss is the sum of the counted labels' cross-entropy divided by this, when given (else
    # their mean): the step's counted labels over its micro-batches on all data-parallel ranks,
    # so that every counted label of the global batch weighs the same whatever the layout.
    loss_denominator: float | None = None
    # DPO: the reference model's summed log-probabilities of each row's labels, float [B].
    reference_logps: torch.Tensor | None = None


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of each token within its row: the number of EOS strictly before it.

    The EOS ending a document belongs to that document, so attention masks built from these ids
    let the EOS see its own document.
    """
    is_eos = (inputs == eos_id).to(torch.int64)
    return torch.cumsum(is_eos, dim=-1) - is_eos


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` in page-locked memory. Not `t.pin_memory()`, which keeps a
    view's strides: copying a non-contiguous host tensor to a GPU first makes a contiguous,
    pageable temporary, and a copy from pageable memory does not overlap with the host."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


def micro_batches(
    rows: np.ndarray, sample_ids: np.ndarray, micro_batch_size: int, eos_id: int | None, pin: bool
) -> list[Batch]:
    """A rank's rows of seq_len + 1 tokens ([B, L + 1]) as micro-batches of inputs and labels
    (shifted by one), with per-token document ids when `eos_id` is given, in pinned memory if
    `pin`. Every text loader (prepared, mixture, streaming) ends here."""
    tokens = torch.from_numpy(np.asarray(rows).astype(np.int64))
    ids_B = torch.from_numpy(np.asarray(sample_ids).astype(np.int64))
    batches = []
    for chunk, ids in zip(
        tokens.split(micro_batch_size), ids_B.split(micro_batch_size), strict=True
    ):
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        doc = document_ids(inputs, eos_id) if eos_id is not None else None
        if pin:
            inputs, labels = pinned(inputs), pinned(labels)
            doc = None if doc is None else pinned(doc)
        batches.append(Batch(inputs, labels, doc, ids))
    return batches


def _too_small(split: str, num_tokens: int, sequences: int, seq_len: int) -> DataError:
    more = "raise data.val_fraction, " if split == "val" else ""
    return DataError(
        f"split '{split}' has {num_tokens:,} tokens, but one global batch of {sequences} "
        f"sequences needs {sequences * seq_len + 1:,} (global batch x seq_len + 1); lower "
        f"data.seq_len or training.global_batch_size, {more}or use a bigger corpus"
    )


class SampleOrder:
    """The data order every loader shares: global batch i of an epoch is the slice
    perm[i*G : (i+1)*G] of the epoch's permutation of `num_samples` samples (from
    `default_rng([seed, epoch])`), and data-parallel rank r takes the r-th contiguous 1/dp of
    it. Its state (epoch, batch index) does not depend on the layout. A subclass sets
    `num_samples` and turns sample ids into batches."""

    num_samples: int
    # What changes the data order, named when a saved order does not fit.
    ORDER_KEYS = "the dataset, data.seq_len, training.global_batch_size or training.seed"

    def __init__(
        self,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        pin_memory: bool,
    ) -> None:
        if seq_len <= 0 or micro_batch_size <= 0 or global_batch_size <= 0:
            raise ValueError("seq_len, global_batch_size and micro_batch_size must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        accumulation_steps(global_batch_size, micro_batch_size, dp_size)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        # Batches in page-locked memory, so that .to(cuda, non_blocking=True) is asynchronous.
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batch_index = 0  # next global batch within the epoch
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (a trailing partial batch is dropped)."""
        return self.num_samples // self.global_batch_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on this rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:  # one permutation per epoch, kept until it rolls over
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = self.epoch
        return self._perm

    def global_batch_samples(self) -> np.ndarray:
        """Sample ids of the next global batch (all ranks), without advancing."""
        g = self.global_batch_size
        return self._permutation()[self.batch_index * g : (self.batch_index + 1) * g]

    def rank_samples(self, samples: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global batch's sample ids."""
        per_rank = self.global_batch_size // self.dp_size
        return samples[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def advance(self) -> None:
        """Move to the next global batch, rolling over into the next epoch."""
        self.batch_index += 1
        if self.batch_index == self.steps_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0

    def metrics(self) -> dict[str, float]:
        """Figures of the data order to log with each step (a mixture's realised shares)."""
        return {}

    def reset(self) -> None:
        """Start again at epoch 0, batch 0 (each evaluation then sees the same batches)."""
        self.epoch = 0
        self.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        """Position and shape of the data order; independent of dp rank and size."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the next global batch of a saved run; DataError if the data order differs."""
        for key in ("num_samples", "seq_len", "global_batch_size", "seed"):
            if key not in state:
                raise DataError(f"loader state has no '{key}'; it was not saved by a data loader")
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"cannot resume the data loader: {key} is {getattr(self, key)} now but "
                    f"{state[key]} in the saved state ({self.ORDER_KEYS} changed)"
                )
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise DataError(f"loader state out of range: epoch {epoch}, batch_index {index}")
        self.epoch, self.batch_index = epoch, index


class TokenLoader(SampleOrder):
    """Deterministic, resumable batches of one split for data-parallel rank `dp_rank`."""

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        document_ids: bool = False,
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
        self.shards = shards
        self.document_ids = document_ids
        self.num_samples = max(shards.num_tokens - 1, 0) // seq_len
        if self.num_samples < global_batch_size:
            raise _too_small(shards.split, shards.num_tokens, global_batch_size, seq_len)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step; advances the loader."""
        samples = self.rank_samples(self.global_batch_samples())
        rows = self.shards.windows(samples * self.seq_len, self.seq_len + 1)
        # One max over the rows (microseconds): an id past the vocabulary would otherwise end
        # as an IndexError deep in the embedding, or a device-side assert on a GPU.
        if rows.size and int(rows.max()) >= self.shards.vocab_size:
            raise self._out_of_vocab(rows, samples)
        self.advance()
        eos = self.shards.eos_id if self.document_ids else None
        return micro_batches(rows, samples, self.micro_batch_size, eos, self.pin_memory)

    def _out_of_vocab(self, rows: np.ndarray, samples: np.ndarray) -> DataError:
        """The error naming the first token of `rows` outside the vocabulary: value and place."""
        vocab = self.shards.vocab_size
        row, col = np.unravel_index(int(np.argmax(rows >= vocab)), rows.shape)
        path, offset = self.shards.locate(int(samples[row]) * self.seq_len + int(col))
        return DataError(
            f"token id {int(rows[row, col])} at token {offset} of {path} (split "
            f"'{self.shards.split}') is not below the vocabulary size {vocab} of the manifest: "
            "the shard is damaged or does not belong to this dataset; `distrib prepare --verify` "
            "checks every shard"
        )


def open_split(data: DataConfig, split: str) -> TokenShards:
    """Open `split` of the dataset in `data.dir` (checking its shards' sizes and spot digests):
    TokenShards for a text dataset, `ExampleShards` (TokenShards plus target masks) for a chat
    or preference one. DataError if the dataset is not of `data.format`."""
    if data.sources:
        from distrib.data.mixture import MixtureShards  # it imports this module

        return MixtureShards.open(data, split)  # type: ignore[return-value]
    kind = read_manifest(data.dir).get("kind", "text")
    if kind != data.format:
        raise DataError(
            f"data.format is {data.format}, but data.dir = {data.dir} holds a {kind} dataset: "
            f"prepare one with data.format = {data.format} in another data.dir, or set "
            f"data.format = {kind}"
        )
    if kind == "text":
        return TokenShards.open(data.dir, split)
    from distrib.data.example_loader import ExampleShards  # it imports this module

    return ExampleShards.open(data.dir, split)


def build_loaders(
    data: DataConfig,
    training: TrainingConfig,
    dp_rank: int,
    dp_size: int,
    pin_memory: bool = False,
    train_shards: TokenShards | None = None,
) -> tuple[TokenLoader | ExampleLoader, TokenLoader | ExampleLoader]:
    """The train loader and the (unshuffled) val loader over the dataset in `data.dir`, with
    batches in pinned memory if `pin_memory` (for a CUDA device). `train_shards`: the training
    split already opened (and checked), so that it is not opened and checked again.

    Val uses the training global batch when the split holds one, else the most full sequences
    it holds, rounded down to a multiple of micro batch x data-parallel size. Opening checks
    the shards' sizes and spot digests. A chat or preference dataset (`data.format`) gets
    `ExampleLoader`s, which have the same interface.
    """
    if data.streaming:
        from distrib.data.streaming import build_streaming_loaders  # it imports this module

        return build_streaming_loaders(data, training, dp_rank, dp_size, pin_memory)  # type: ignore[return-value]
    if data.sources:
        from distrib.data.mixture_loader import build_mixture_loaders  # it imports this module

        return build_mixture_loaders(data, training, dp_rank, dp_size, pin_memory, train_shards)  # type: ignore[return-value,arg-type]
    train_shards = train_shards or open_split(data, "train")
    if data.format != "text":
        from distrib.data.example_loader import build_example_loaders

        return build_example_loaders(data, training, dp_rank, dp_size, pin_memory, train_shards)
    common = {
        "seq_len": data.seq_len,
        "micro_batch_size": training.micro_batch_size,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "seed": training.seed,
        "document_ids": not data.cross_document_attention,
        "pin_memory": pin_memory,
    }
    train = TokenLoader(train_shards, global_batch_size=training.global_batch_size, **common)
    val_shards = TokenShards.open(data.dir, "val")
    per_step = training.micro_batch_size * dp_size
    val_samples = max(val_shards.num_tokens - 1, 0) // data.seq_len
    val_batch = min(training.global_batch_size, val_samples // per_step * per_step)
    if val_batch < per_step:
        raise _too_small("val", val_shards.num_tokens, per_step, data.seq_len)
    val = TokenLoader(val_shards, global_batch_size=val_batch, shuffle=False, **common)
    return train, val
