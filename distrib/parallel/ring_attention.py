"""Ring attention: exact causal attention over sequences split across the context-parallel ranks.

Each rank holds two chunks of every sequence (`distrib.parallel.cp_chunks`). At step t rank r
attends its queries to the keys and values of rank r - t while it already sends them on to
rank r + 1, so the next block travels during the math. The partial results merge by their
log-sum-exp (flash attention's online softmax), which makes the result exact attention. Backward
goes round the ring again: each key/value block travels with the gradient accumulated for it, and
that gradient reaches its owner after cp hops.

Per pair of chunks the work is one of three kinds: a key chunk later than the query chunk is
skipped (causal), the same chunk takes the causal mask, an earlier chunk is seen whole. A
document mask (packed sequences) and a sliding window narrow the pairs further; their ids travel
round the ring with the keys.

Why by hand: torch's context parallelism (`torch.distributed.tensor.experimental
.context_parallel`) dispatches only the CUDA SDPA kernels (flash, memory-efficient, cuDNN), takes
no mask, so neither document masking nor a sliding window, and its API changed between torch 2.11
and 2.13. This runs on any device, the CPU with gloo included. The block math is matmul and a
float32 softmax over one pair of chunks at a time; the fused kernels run under
`parallel.cp_mode = "alltoall"` (`distrib.parallel.ulysses`).

Shape legend: B batch, H query heads, G kv heads, N local tokens (two chunks), C chunk (N / 2),
K head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distrib.models.attention import DocSegments
from distrib.parallel.cp_chunks import check_length, rank_chunks

# A finite "minus infinity" for log-sum-exps: a query row that sees nothing in one block (before
# its document starts, or beyond its window) merges as weight zero instead of as NaN.
_NEG = -1e30


@dataclass(frozen=True)
class Ring:
    """The cp ranks of this process's group, in ring order."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def _global(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.size)

    def pass_on(self, tensors: list[Tensor]) -> Callable[[], list[Tensor]]:
        """Send `tensors` to the next rank and receive the previous rank's into new buffers,
        asynchronously; call the result to wait for them."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [
            dist.P2POp(dist.isend, t.contiguous(), self._global(1), self.group, tag=i)
            for i, t in enumerate(tensors)
        ]
        ops += [
            dist.P2POp(dist.irecv, r, self._global(-1), self.group, tag=i)
            for i, r in enumerate(received)
        ]
        requests = dist.batch_isend_irecv(ops)

        def wait() -> list[Tensor]:
            for request in requests:
                request.wait()
            return received

        return wait


def _pairs(
    rank: int, source: int, cp: int, chunk: int, window: int
) -> Iterator[tuple[int, int, int, int]]:
    """(local query chunk, local key chunk, their indices in the whole sequence) of every pair of
    this rank's query chunks and `source`'s key chunks where some query sees some key."""
    for a, q_chunk in enumerate(rank_chunks(rank, cp)):
        for b, k_chunk in enumerate(rank_chunks(source, cp)):
            if k_chunk > q_chunk:
                continue  # all in the future
            if window > 0 and (k_chunk + 1) * chunk - 1 <= q_chunk * chunk - window:
                continue  # all beyond the window
            yield a, b, q_chunk, k_chunk


def _pair_mask(
    q_chunk: int,
    k_chunk: int,
    chunk: int,
    window: int,
    q_docs_BC: Tensor | None,
    k_docs_BC: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Boolean "may attend" `[C, C]` or `[B, 1, C, C]` for one pair, or None when all may."""
    allowed = None
    if q_chunk == k_chunk or window > 0:
        q_pos = torch.arange(q_chunk * chunk, (q_chunk + 1) * chunk, device=device)[:, None]
        k_pos = torch.arange(k_chunk * chunk, (k_chunk + 1) * chunk, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window > 0:
            allowed = allowed & (k_pos > q_pos - window)
    if q_docs_BC is None or k_docs_BC is None:
        return allowed
    same_BCC = q_docs_BC[:, :, None] == k_docs_BC[:, None, :]
    return (same_BCC if allowed is None else same_BCC & allowed)[:, None]


def _blocks(
    ring: Ring,
    source: int,
    chunk: int,
    window: int,
    q_docs_BN: Tensor | None,
    k_docs_BN: Tensor | None,
    device: torch.device,
) -> Iterator[tuple[slice, slice, Tensor | None]]:
    """(this rank's query rows, `source`'s key rows, their mask) of every pair of chunks to
    compute (see `_pairs`)."""
    for a, b, q_chunk, k_chunk in _pairs(ring.rank, source, ring.size, chunk, window):
        qs, ks = slice(a * chunk, (a + 1) * chunk), slice(b * chunk, (b + 1) * chunk)
        q_docs = None if q_docs_BN is None else q_docs_BN[:, qs]
        k_docs = None if k_docs_BN is None else k_docs_BN[:, ks]
        yield qs, ks, _pair_mask(q_chunk, k_chunk, chunk, window, q_docs, k_docs, device)


def _scores(q_BHCK: Tensor, k_BHCK: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    s_BHCC = (q_BHCK @ k_BHCK.transpose(-2, -1)) * scale
    return s_BHCC if mask is None else s_BHCC.masked_fill(~mask, float("-inf"))


def _block(
    q_BHCK: Tensor, k_BHCK: Tensor, v_BHCK: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of one pair of chunks (at least float32): its output and each query's
    log-sum-exp."""
    s_BHCC = _scores(q_BHCK, k_BHCK, mask, scale)
    m_BHC1 = s_BHCC.amax(-1, keepdim=True).clamp_min(_NEG)
    p_BHCC = torch.exp(s_BHCC - m_BHC1)
    l_BHC1 = p_BHCC.sum(-1, keepdim=True)
    o_BHCK = (p_BHCC @ v_BHCK) / l_BHC1.clamp_min(torch.finfo(l_BHC1.dtype).tiny)
    return o_BHCK, (m_BHC1 + torch.log(l_BHC1)).squeeze(-1).clamp_min(_NEG)


def _upcast(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64, for reference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _repeat(x_BGNK: Tensor, n_rep: int) -> Tensor:
    # The HF / Megatron grouping: kv head g serves query heads g * n_rep .. (g + 1) * n_rep - 1.
    x_BGNK = _upcast(x_BGNK)
    return x_BGNK if n_rep == 1 else x_BGNK.repeat_interleave(n_rep, dim=1)


def _fold(x_BHNK: Tensor, n_rep: int) -> Tensor:
    """The gradient of `_repeat`: the query heads' shares added per kv head."""
    B, H, N, K = x_BHNK.shape
    return x_BHNK.view(B, H // n_rep, n_rep, N, K).sum(2)


def _doc_tensor(doc_ids_BN: Tensor | DocSegments | None) -> Tensor | None:
    return doc_ids_BN.doc_ids_BL if isinstance(doc_ids_BN, DocSegments) else doc_ids_BN


def _ring_forward(
    q_BHNK: Tensor, k_BGNK: Tensor, v_BGNK: Tensor, docs_BN: Tensor | None, ring: Ring, window: int
) -> tuple[Tensor, Tensor]:
    B, H, N, K = q_BHNK.shape
    device = q_BHNK.device
    chunk, n_rep, scale = N // 2, H // k_BGNK.shape[1], K**-0.5
    q_BHNK = _upcast(q_BHNK)
    out_BHNK = torch.zeros_like(q_BHNK)
    lse_BHN = torch.full((B, H, N), _NEG, dtype=q_BHNK.dtype, device=q_BHNK.device)
    held = [torch.stack([k_BGNK, v_BGNK])] + ([docs_BN] if docs_BN is not None else [])
    for step in range(ring.size):
        wait = ring.pass_on(held) if step < ring.size - 1 else None
        source = (ring.rank - step) % ring.size
        k_BHNK, v_BHNK = _repeat(held[0][0], n_rep), _repeat(held[0][1], n_rep)
        k_docs = held[1] if docs_BN is not None else None
        for qs, ks, mask in _blocks(ring, source, chunk, window, docs_BN, k_docs, device):
            o_BHCK, lse_BHC = _block(
                q_BHNK[:, :, qs], k_BHNK[:, :, ks], v_BHNK[:, :, ks], mask, scale
            )
            new_BHC = torch.logaddexp(lse_BHN[:, :, qs], lse_BHC)
            out_BHNK[:, :, qs] = (
                out_BHNK[:, :, qs] * torch.exp(lse_BHN[:, :, qs] - new_BHC)[..., None]
                + o_BHCK * torch.exp(lse_BHC - new_BHC)[..., None]
            )
            lse_BHN[:, :, qs] = new_BHC
        if wait is not None:
            held = wait()
    return out_BHNK, lse_BHN


def _ring_backward(
    dout_BHNK: Tensor,
    q_BHNK: Tensor,
    k_BGNK: Tensor,
    v_BGNK: Tensor,
    out_BHNK: Tensor,
    lse_BHN: Tensor,
    docs_BN: Tensor | None,
    ring: Ring,
    window: int,
) -> tuple[Tensor, Tensor, Tensor]:
    B, H, N, K = q_BHNK.shape
    device = q_BHNK.device
    chunk, n_rep, scale = N // 2, H // k_BGNK.shape[1], K**-0.5
    qf_BHNK, do_BHNK = _upcast(q_BHNK), _upcast(dout_BHNK)
    delta_BHN = (do_BHNK * _upcast(out_BHNK)).sum(-1)  # rowsum(dO * O), flash attention's D
    dq_BHNK = torch.zeros_like(qf_BHNK)
    held = [torch.stack([k_BGNK, v_BGNK])] + ([docs_BN] if docs_BN is not None else [])
    # The gradient of the keys and values held now; it travels with them and arrives home last.
    dkv_2BGNK = torch.zeros(held[0].shape, dtype=qf_BHNK.dtype, device=q_BHNK.device)
    for step in range(ring.size):
        wait = ring.pass_on(held) if step < ring.size - 1 else None
        source = (ring.rank - step) % ring.size
        k_BHNK, v_BHNK = _repeat(held[0][0], n_rep), _repeat(held[0][1], n_rep)
        k_docs = held[1] if docs_BN is not None else None
        dk_BHNK, dv_BHNK = torch.zeros_like(k_BHNK), torch.zeros_like(v_BHNK)
        for qs, ks, mask in _blocks(ring, source, chunk, window, docs_BN, k_docs, device):
            q_BHCK, k_BHCK, do_BHCK = qf_BHNK[:, :, qs], k_BHNK[:, :, ks], do_BHNK[:, :, qs]
            p_BHCC = torch.exp(_scores(q_BHCK, k_BHCK, mask, scale) - lse_BHN[:, :, qs, None])
            dv_BHNK[:, :, ks] += p_BHCC.transpose(-2, -1) @ do_BHCK
            dp_BHCC = do_BHCK @ v_BHNK[:, :, ks].transpose(-2, -1)
            ds_BHCC = p_BHCC * (dp_BHCC - delta_BHN[:, :, qs, None]) * scale
            dq_BHNK[:, :, qs] += ds_BHCC @ k_BHCK
            dk_BHNK[:, :, ks] += ds_BHCC.transpose(-2, -1) @ q_BHCK
        dkv_2BGNK += torch.stack([_fold(dk_BHNK, n_rep), _fold(dv_BHNK, n_rep)])
        dkv_2BGNK = ring.pass_on([dkv_2BGNK])()[0]
        if wait is not None:
            held = wait()
    return dq_BHNK.to(q_BHNK.dtype), dkv_2BGNK[0].to(k_BGNK.dtype), dkv_2BGNK[1].to(v_BGNK.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q_BHNK: Tensor,
        k_BGNK: Tensor,
        v_BGNK: Tensor,
        docs_BN: Tensor | None,
        ring: Ring,
        window: int,
    ) -> Tensor:
        out_BHNK, lse_BHN = _ring_forward(q_BHNK, k_BGNK, v_BGNK, docs_BN, ring, window)
        out_BHNK = out_BHNK.to(q_BHNK.dtype)
        ctx.save_for_backward(q_BHNK, k_BGNK, v_BGNK, out_BHNK, lse_BHN, docs_BN)
        ctx.ring, ctx.window = ring, window  # type: ignore[attr-defined]
        return out_BHNK

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dout_BHNK: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, docs = ctx.saved_tensors  # type: ignore[attr-defined]
        dq, dk, dv = _ring_backward(dout_BHNK, q, k, v, out, lse, docs, ctx.ring, ctx.window)  # type: ignore[attr-defined]
        return dq, dk, dv, None, None, None


@torch.compiler.disable
def ring_attention(
    q_BHNK: Tensor,
    k_BGNK: Tensor,
    v_BGNK: Tensor,
    doc_ids_BN: Tensor | DocSegments | None,
    window: int,
    ring: Ring,
) -> Tensor:
    """Causal attention of this rank's queries to the keys of the whole sequences, whose other
    shares the other ranks of `ring` hold (see the module docstring); with `doc_ids_BN` within
    documents, with `window > 0` within the last `window` positions. Differentiable.

    Compiled blocks leave this call to eager (`torch.compiler.disable`): it is point-to-point
    communication and a custom backward, not one graph."""
    check_length(q_BHNK.shape[2] * ring.size, ring.size)
    return _RingAttention.apply(q_BHNK, k_BGNK, v_BGNK, _doc_tensor(doc_ids_BN), ring, window)
