"""All-to-all context parallelism (DeepSpeed Ulysses): heads scattered, sequences gathered.

Before attention one all-to-all turns "all heads, my share of the sequence" into "my share of
the heads, the whole sequence" on every cp rank; the configured attention backend (flash_attn,
SDPA's fused kernels, eager) then runs unchanged on whole sequences, document masks included,
and a second all-to-all turns the output back. Each rank sends 4 x (cp - 1) / cp of its q, k, v
and output per layer whatever cp is, against ring attention's (cp - 1) passes of k and v; it
needs cp to divide the heads each tensor-parallel rank holds. Kv heads fewer than cp are
repeated up to the query heads first (grouped-query attention keeps its saving only when cp
divides them).

Shape legend: B batch, H query heads, G kv heads, N local tokens, L whole sequence (cp x N),
K head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from distrib.models.attention import DocSegments, attention
from distrib.parallel.cp_chunks import check_length, gathered_positions


def _all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Equal slices of dim 0 swapped between the ranks, differentiable (torch's functional
    collective, the one its own context parallelism uses; the older torch.distributed.nn
    form is deprecated)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))


def _heads_to_sequence(x_BHNK: Tensor, group: dist.ProcessGroup, cp: int) -> Tensor:
    """`[B, H / cp, L, K]` in rank order: my heads' share, every rank's tokens."""
    B, H, N, K = x_BHNK.shape
    send = x_BHNK.reshape(B, cp, H // cp, N, K).transpose(0, 1).contiguous()
    got = _all_to_all(send, group)
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * N, K)


def _sequence_to_heads(y_BHLK: Tensor, group: dist.ProcessGroup, cp: int) -> Tensor:
    """The inverse of `_heads_to_sequence`: `[B, H, N, K]`, all heads of my tokens."""
    B, Hc, L, K = y_BHLK.shape
    send = y_BHLK.reshape(B, Hc, cp, L // cp, K).permute(2, 0, 1, 3, 4).contiguous()
    got = _all_to_all(send, group)
    return got.transpose(0, 1).reshape(B, cp * Hc, L // cp, K)


def ulysses_attention(
    q_BHNK: Tensor,
    k_BGNK: Tensor,
    v_BGNK: Tensor,
    doc_ids_BN: Tensor | DocSegments | None,
    window: int,
    group: dist.ProcessGroup,
    backend: str,
) -> Tensor:
    """Causal attention of this rank's tokens over the whole sequences by all-to-all (see the
    module docstring), with the `backend` the model is configured for. Differentiable."""
    cp = dist.get_world_size(group)
    B, H, N, K = q_BHNK.shape
    check_length(N * cp, cp)
    if H % cp:
        raise ValueError(
            f"parallel.cp_mode = 'alltoall' scatters attention heads over the {cp} cp ranks: "
            f"the {H} query heads per tensor-parallel rank are not a multiple of {cp}; use "
            "parallel.cp_mode = 'ring' or a cp that divides them"
        )
    if k_BGNK.shape[1] % cp:
        n_rep = H // k_BGNK.shape[1]
        k_BGNK = k_BGNK.repeat_interleave(n_rep, dim=1)
        v_BGNK = v_BGNK.repeat_interleave(n_rep, dim=1)
    # The gathered tokens come in rank order (each rank's early and late chunk); attention
    # wants them in sequence order, and the output goes back in rank order.
    order_L = gathered_positions(cp, N, q_BHNK.device)
    natural_L = torch.argsort(order_L)
    q, k, v = (_heads_to_sequence(x, group, cp)[:, :, natural_L] for x in (q_BHNK, k_BGNK, v_BGNK))
    docs_BL = None
    if doc_ids_BN is not None:
        docs_BN = doc_ids_BN.doc_ids_BL if isinstance(doc_ids_BN, DocSegments) else doc_ids_BN
        parts = [torch.empty_like(docs_BN) for _ in range(cp)]
        dist.all_gather(parts, docs_BN.contiguous(), group=group)
        docs_BL = torch.cat(parts, dim=1)[:, natural_L]
    out_BHLK = attention(q, k, v, backend, docs_BL, window)
    return _sequence_to_heads(out_BHLK[:, :, order_L], group, cp)
