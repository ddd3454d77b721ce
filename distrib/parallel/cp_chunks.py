"""Which tokens of a sequence each context-parallel rank holds: the causal load balancing.

A sequence of L tokens is cut into 2 x cp equal chunks and rank r holds chunks r and
2cp - 1 - r, one early and one late. Under a causal mask a late query sees many keys and an early
one few, so each rank ends up with the same amount of attention work (the "zigzag" or head-tail
layout of Megatron-Core and torchtitan); with plain contiguous slices the last rank would do
about 2cp - 1 times the work of the first.

Shape legend: B batch, L sequence (whole), N local tokens of one rank (L / cp), C chunk (L / 2cp).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_length(length: int, cp: int) -> None:
    """Refuse a sequence that does not cut into 2 x cp equal chunks, naming what would."""
    if length % (2 * cp):
        lower = length - length % (2 * cp)
        fits = [n for n in (lower, lower + 2 * cp) if n > 0]
        raise ValueError(
            f"context parallelism over {cp} ranks cuts each sequence into 2 x cp = {2 * cp} equal "
            f"chunks (an early and a late one per rank, for causal load balancing): the length "
            f"{length} is not a multiple of {2 * cp}; the nearest lengths that are: {fits}"
        )


def rank_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The indices (of the 2 x cp chunks) of the two chunks that `rank` holds, in its order."""
    return rank, 2 * cp - 1 - rank


def rank_positions(
    rank: int, cp: int, local_len: int, device: torch.device | None = None
) -> Tensor:
    """`[N]`: the positions in the whole sequence of the `local_len` tokens `rank` holds."""
    chunk = local_len // 2
    return torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in rank_chunks(rank, cp)]
    )


def gathered_positions(cp: int, local_len: int, device: torch.device | None = None) -> Tensor:
    """`[L]`: the position of each token of the ranks' shares laid end to end in rank order,
    as an all-gather or all-to-all over the cp group leaves them."""
    return torch.cat([rank_positions(r, cp, local_len, device) for r in range(cp)])


def shard_sequence(x_BL: Tensor, rank: int, cp: int) -> Tensor:
    """`[B, N]` (or more trailing dims): the tokens of `x_BL` along dim 1 that `rank` holds."""
    check_length(x_BL.shape[1], cp)
    chunks = x_BL.chunk(2 * cp, dim=1)
    first, second = rank_chunks(rank, cp)
    return torch.cat([chunks[first], chunks[second]], dim=1)
