"""Attention under context parallelism equals attention over the whole sequence.

Each cp rank holds its two load-balanced chunks of q, k and v; ring attention and the all-to-all
form must give that rank's rows of full attention, and the gradients of its rows of q, k and v,
for causal, document-masked and sliding-window inputs with grouped kv heads. The reference is the
eager backend on the whole sequence. Inputs are float64 but both sides compute in float32 (the
eager reference upcasts to float32 only): tolerance atol 1e-5 on values of order 1 (measured:
below 8e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distrib.models.attention import eager_attention
from distrib.parallel.cp_chunks import (
    check_length,
    gathered_positions,
    rank_positions,
    shard_sequence,
)
from distrib.parallel.ring_attention import Ring, ring_attention
from distrib.parallel.ulysses import ulysses_attention
from tests.distributed.harness import spawn

ATOL = 1e-5
B, H, G, K = 2, 4, 2, 8


def _docs(length: int) -> torch.Tensor:
    """Two rows: several documents of uneven lengths, and one document."""
    cuts = [length // 5, length // 2 + 3, length - 7]
    first = torch.zeros(length, dtype=torch.int64)
    for cut in cuts:
        first[cut:] += 1
    return torch.stack([first, torch.zeros(length, dtype=torch.int64)])


def _local(x_BHLK: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    return shard_sequence(x_BHLK.transpose(1, 2), rank, cp).transpose(1, 2).contiguous()


def _check_all(rank: int, cp: int, length: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, length, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, G, length, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, G, length, K, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, H, length, K, generator=g, dtype=torch.float64)
    ring = Ring(dist.group.WORLD, rank, cp)
    for docs in (None, _docs(length)):
        for window in (0, length // 3):
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            want = eager_attention(*full, docs, window)
            (want * grad_out).sum().backward()
            for mode in ("ring", "alltoall"):
                local = [_local(x, rank, cp).requires_grad_() for x in (q, k, v)]
                local_docs = None if docs is None else shard_sequence(docs, rank, cp)
                if mode == "ring":
                    got = ring_attention(*local, local_docs, window, ring)
                else:
                    got = ulysses_attention(*local, local_docs, window, dist.group.WORLD, "eager")
                (got * _local(grad_out, rank, cp)).sum().backward()
                where = f"{mode}, docs={docs is not None}, window={window}, rank {rank}"
                torch.testing.assert_close(
                    got, _local(want, rank, cp), atol=ATOL, rtol=0, msg=where
                )
                for name, mine, whole in zip("qkv", local, full, strict=True):
                    torch.testing.assert_close(
                        mine.grad,
                        _local(whole.grad, rank, cp),
                        atol=ATOL,
                        rtol=0,
                        msg=f"d{name}: {where}",
                    )


def _attention_matches(rank: int, world_size: int, length: int) -> None:
    _check_all(rank, world_size, length)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_equals_full_attention(cp: int) -> None:
    # 96 = 2 x 4 x 12: chunks of 12 (cp 4) and 24 (cp 2); the window cuts through chunks.
    spawn(_attention_matches, cp, 96)


def test_positions_are_the_load_balanced_chunks() -> None:
    # cp 2, 8 tokens: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert rank_positions(0, 2, 4).tolist() == [0, 1, 6, 7]
    assert rank_positions(1, 2, 4).tolist() == [2, 3, 4, 5]
    assert gathered_positions(2, 4).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    x = torch.arange(8)[None]
    assert shard_sequence(x, 1, 2).tolist() == [[2, 3, 4, 5]]
    # Every position exactly once over the ranks, for several degrees.
    for cp in (1, 2, 3, 4, 8):
        assert sorted(gathered_positions(cp, 6).tolist()) == list(range(6 * cp))


def test_length_not_cut_into_2cp_chunks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"length 100 is not a multiple of 8.*\[96, 104\]"):
        check_length(100, 4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        shard_sequence(torch.zeros(1, 6), 0, 2)
