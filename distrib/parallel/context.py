"""Context parallelism: every sequence split over the cp ranks of the mesh.

Three pieces, each applied from outside the model:
- `apply_cp` gives each attention layer an attention that exchanges keys and values with the
  other cp ranks: ring attention (`distrib.parallel.ring_attention`) or all-to-all over heads
  (`distrib.parallel.ulysses`), as `parallel.cp_mode` says. Everything else in a block works
  token by token and needs nothing.
- `ContextParallel.shard` cuts each micro-batch (inputs, labels, document ids) to this rank's two
  load-balanced chunks (`distrib.parallel.cp_chunks`), and sets the loss denominator to the whole
  sequences' label count over cp, so that FSDP's average over the cp ranks (they sit in its
  "dp_shard_cp" mesh) makes the gradient, and the mean over ranks the loss, those of the whole
  sequences, identical to a run without cp.
- `ContextParallel.positions` gives the model, for one step, the RoPE tables of its tokens'
  positions in the whole sequence (torchtitan shards its `freqs_cis` buffer the same way).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import replace

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distrib.data.loader import Batch
from distrib.models.loss import IGNORE_INDEX
from distrib.models.transformer import Attention
from distrib.parallel.cp_chunks import rank_positions, shard_sequence
from distrib.parallel.ring_attention import Ring, ring_attention
from distrib.parallel.ulysses import ulysses_attention


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, mode: str) -> None:
    """Make every attention layer of `model` context-parallel over `cp_mesh` (1-D)."""
    group = cp_mesh.get_group()
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        if mode == "ring":
            ring = Ring(group, cp_mesh.get_local_rank(), cp_mesh.size())
            module.context_parallel = functools.partial(_ring, ring=ring)
        else:
            module.context_parallel = functools.partial(
                _alltoall, group=group, backend=module.backend
            )


def _ring(q, k, v, doc_ids, window, ring):  # noqa: ANN001, ANN202 - ContextAttention's args
    return ring_attention(q, k, v, doc_ids, window, ring)


def _alltoall(q, k, v, doc_ids, window, group, backend):  # noqa: ANN001, ANN202
    return ulysses_attention(q, k, v, doc_ids, window, group, backend)


class ContextParallel:
    """This rank's place among the cp ranks: which tokens of each sequence it trains on."""

    def __init__(self, cp_mesh: DeviceMesh) -> None:
        self.rank = cp_mesh.get_local_rank()
        self.size = cp_mesh.size()

    def shard(self, batch: Batch) -> Batch:
        """This rank's share of `batch`; its loss is the summed cross-entropy of its labels over
        (the whole micro-batch's label count, or its given denominator) / cp."""
        if batch.loss_denominator is not None:
            whole = batch.loss_denominator
        else:
            whole = float((batch.labels != IGNORE_INDEX).sum())
        docs = batch.doc_ids
        return replace(
            batch,
            inputs=shard_sequence(batch.inputs, self.rank, self.size),
            labels=shard_sequence(batch.labels, self.rank, self.size),
            doc_ids=None if docs is None else shard_sequence(docs, self.rank, self.size),
            loss_denominator=whole / self.size,
        )

    @contextlib.contextmanager
    def positions(self, parts: list[nn.Module], local_len: int) -> Iterator[None]:
        """While open, each part's RoPE tables are those of this rank's `local_len` positions;
        the whole tables come back after (the tables a block used in forward stay with its
        autograd graph, so backward inside or outside the block is alike)."""
        saved = []
        for part in parts:
            cos, sin = getattr(part, "rope_cos", None), getattr(part, "rope_sin", None)
            if cos is None or sin is None:
                continue
            where = rank_positions(self.rank, self.size, local_len, cos.device)
            saved.append((part, cos, sin))
            part.rope_cos, part.rope_sin = cos[where], sin[where]
        try:
            yield
        finally:
            for part, cos, sin in saved:
                part.rope_cos, part.rope_sin = cos, sin
