"""Batches drawn from several sources in configured proportions, layout-independent and resumable.

Each global batch has `G` slots. Slot after slot, the source whose share is furthest behind its
weight takes it (the greedy rule of Megatron's blended datasets): after n slots of a weight
segment, source j has had the integer nearest to n x w_j, never more than one sample off. The
slots of the batch are filled in order, each with the next sample of its source; every source
walks its own permutation of its samples, one per epoch (`default_rng([seed, j, epoch])`), so
within an epoch each sample is drawn once. Data-parallel rank r takes the r-th contiguous 1/dp of
the batch, so global batch i is the same whatever the layout, and the state (each source's
position, the counts of the current segment) does not depend on it: a resume under another
data-parallel degree continues exactly.

A weight segment starts at step 1, at each `data.weight_schedule` step and when a source reaches
its `max_epochs` (its weight is then 0 and the others share its part).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from distrib.config import DataConfig, TrainingConfig
from distrib.config.mixture import MixtureSource, parse_schedule, parse_sources, weights_at
from distrib.config.rules import accumulation_steps
from distrib.data.loader import Batch, TokenLoader, micro_batches
from distrib.data.mixture import MixtureShards
from distrib.errors import DataError


class SourceCursor:
    """Where a source's sample order stands: its epoch, the position in that epoch's
    permutation, and the samples drawn in all (against its `max_epochs` cap)."""

    def __init__(self, num_samples: int, seed: int, index: int, max_epochs: float) -> None:
        self.num_samples = num_samples
        self.seed, self.index = seed, index
        self.cap = int(max_epochs * num_samples) if max_epochs > 0 else None
        self.epoch = self.position = self.drawn = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def remaining(self) -> float:
        return float("inf") if self.cap is None else self.cap - self.drawn

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.index, self.epoch])
            self._perm = (self.epoch, rng.permutation(self.num_samples))
        return self._perm[1]

    def take(self) -> int:
        sample = int(self._permutation()[self.position])
        self.position += 1
        self.drawn += 1
        if self.position == self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        return sample

    def state(self) -> list[int]:
        return [self.epoch, self.position, self.drawn]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.position, self.drawn = (int(v) for v in state)


class MixtureLoader:
    """The training loader of a mixture: TokenLoader's interface (`next_step`, `state_dict`,
    `grad_accum_steps`), batches from several sources."""

    def __init__(
        self,
        shards: MixtureShards,
        sources: list[MixtureSource],
        schedule: list[Any],
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        document_ids: bool = False,
        pin_memory: bool = False,
    ) -> None:
        accumulation_steps(global_batch_size, micro_batch_size, dp_size)
        self.sources, self.schedule = sources, schedule
        self.shards = [shards.sources[s.name] for s in sources]
        self.seq_len, self.seed = seq_len, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_ids, self.pin_memory = document_ids, pin_memory
        self.eos_id = shards.eos_id
        sizes = [max(s.num_tokens - 1, 0) // seq_len for s in self.shards]
        for source, size in zip(sources, sizes, strict=True):
            if size == 0 and source.weight > 0:
                raise DataError(f"source '{source.name}' holds no sequence of {seq_len} tokens")
        # Sample ids unique across sources (for the exactly-once records): offset + sample.
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.cursors = [
            SourceCursor(n, seed, j, s.max_epochs)
            for j, (n, s) in enumerate(zip(sizes, sources, strict=True))
        ]
        self.step = 0  # global batches drawn
        self.segment: list[float] = []  # normalised weights of the current segment
        self.counts = [0] * len(sources)  # slots per source in the current segment

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _weights(self) -> list[float]:
        """This step's normalised weights over the sources that still have samples."""
        configured = weights_at(self.sources, self.schedule, self.step + 1)
        raw = [
            configured[s.name] if c.remaining() > 0 else 0.0
            for s, c in zip(self.sources, self.cursors, strict=True)
        ]
        total = sum(raw)
        if total <= 0:
            raise DataError(
                f"step {self.step + 1}: every source with a weight has reached its max_epochs; "
                "raise data.sources' max_epochs or lower training.steps"
            )
        return [w / total for w in raw]

    def _slot(self) -> int:
        weights = self._weights()
        if weights != self.segment:  # a new segment: schedule step, or a source ran out
            self.segment, self.counts = weights, [0] * len(weights)
        n = sum(self.counts) + 1
        lag = [w * n - c if w > 0 else -np.inf for w, c in zip(weights, self.counts, strict=True)]
        j = int(np.argmax(lag))  # ties: the source listed first
        self.counts[j] += 1
        return j

    def global_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample id within the source) of each row of the next global batch;
        advances the loader."""
        picks = [
            (j, self.cursors[j].take())
            for j in (self._slot() for _ in range(self.global_batch_size))
        ]
        self.step += 1
        sources, samples = (np.array(v, dtype=np.int64) for v in zip(*picks, strict=True))
        return sources, samples

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step."""
        sources, samples = self.global_batch()
        per_rank = self.global_batch_size // self.dp_size
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        sources, samples = sources[mine], samples[mine]
        rows = np.stack(
            [
                self.shards[j].window(int(i) * self.seq_len, self.seq_len + 1)
                for j, i in zip(sources, samples, strict=True)
            ]
        )
        eos = self.eos_id if self.document_ids else None
        ids = self.offsets[sources] + samples
        return micro_batches(rows, ids, self.micro_batch_size, eos, self.pin_memory)

    def metrics(self) -> dict[str, float]:
        """Each source's realised share of the sequences drawn so far (`data_share/<name>`) and
        its weight now, normalised over the sources that still have samples (`data_weight/`)."""
        total = sum(c.drawn for c in self.cursors) or 1
        out = {}
        for j, (s, c) in enumerate(zip(self.sources, self.cursors, strict=True)):
            out[f"data_share/{s.name}"] = c.drawn / total
            if self.segment:
                out[f"data_weight/{s.name}"] = self.segment[j]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Layout-independent: the step, the segment, each source's position; one JSON string
        (the checkpoint then stores one value whatever the number of sources)."""
        state = {
            "step": self.step,
            "segment": self.segment,
            "counts": self.counts,
            "cursors": {s.name: c.state() for s, c in zip(self.sources, self.cursors, strict=True)},
            "order": self._order(),
        }
        return {"mixture": json.dumps(state)}

    def _order(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "samples": {
                s.name: c.num_samples for s, c in zip(self.sources, self.cursors, strict=True)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mixture" not in state:
            raise DataError(
                "the checkpoint's loader state is not a mixture's: data.sources was added since"
            )
        saved = json.loads(state["mixture"])
        if saved["order"] != self._order():
            raise DataError(
                f"cannot resume the mixture: its data order was {saved['order']}, now "
                f"{self._order()} (the sources, data.seq_len, training.global_batch_size or "
                "training.seed changed)"
            )
        self.step, self.segment, self.counts = saved["step"], saved["segment"], saved["counts"]
        for s, c in zip(self.sources, self.cursors, strict=True):
            c.restore(saved["cursors"][s.name])


class MixtureValidation:
    """One unshuffled validation loader per source; `val_loss` averages them with the first
    weights, so that the figure stays comparable while a schedule changes the mix."""

    def __init__(self, loaders: dict[str, TokenLoader], weights: dict[str, float]) -> None:
        self.loaders = loaders
        total = sum(weights.values())
        self.weights = {n: w / total for n, w in weights.items()}


def build_mixture_loaders(
    data: DataConfig,
    training: TrainingConfig,
    dp_rank: int,
    dp_size: int,
    pin_memory: bool,
    train_shards: MixtureShards | None,
) -> tuple[MixtureLoader, MixtureValidation]:
    sources = parse_sources(data.sources)
    schedule = parse_schedule(data.weight_schedule, [s.name for s in sources])
    train_shards = train_shards or MixtureShards.open(data, "train")
    common = {
        "seq_len": data.seq_len,
        "micro_batch_size": training.micro_batch_size,
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "seed": training.seed,
        "document_ids": not data.cross_document_attention,
        "pin_memory": pin_memory,
    }
    train = MixtureLoader(
        train_shards, sources, schedule, global_batch_size=training.global_batch_size, **common
    )
    val_shards = MixtureShards.open(data, "val")
    per_step = training.micro_batch_size * dp_size
    loaders = {}
    for name, shards in val_shards.sources.items():
        samples = max(shards.num_tokens - 1, 0) // data.seq_len
        batch = min(training.global_batch_size, samples // per_step * per_step)
        if batch < per_step:
            raise DataError(
                f"source '{name}': its val split has {shards.num_tokens:,} tokens, fewer than one "
                f"micro-batch per rank needs ({per_step} x {data.seq_len}); raise "
                "data.val_fraction or lower data.seq_len"
            )
        loaders[name] = TokenLoader(shards, global_batch_size=batch, shuffle=False, **common)
    return train, MixtureValidation(loaders, {s.name: s.weight for s in sources})
