"""Causal attention backends: flash_attn (when importable, CUDA), PyTorch SDPA, and an eager reference.

All backends take `[B, H, L, K]` queries and `[B, Hkv, L, K]` keys/values (grouped-query attention:
H is a multiple of Hkv), are always causal, and optionally mask attention across documents of a
packed sequence (`doc_ids_BL`: a token attends only to earlier tokens with the same doc id).

Shape legend: B batch, L sequence, H query heads, G kv heads (Hkv), K head dim, T total tokens
(B * L, flattened for varlen flash), S number of documents (segments) + 1.

On CUDA the sdpa backend is pinned to PyTorch's fused kernels where dtype and head dim allow
(`sdpa_kernels`), so it does not drop silently to the math kernel. Which kernel runs is logged
once per combination on the "distrib.attention" logger.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "flash", "sdpa", "eager")

log = logging.getLogger("distrib.attention")

# The builtin has no inspectable signature; its docstring carries it. enable_gqa (torch >= 2.5)
# lets SDPA broadcast kv heads without materializing the repeated copies.
_SDPA_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
# Without set_priority, sdpa_kernel only allows the listed kernels and SDPA tries them in its own
# global order; with it, the list order is the preference.
_SDPA_KERNEL_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

_HALF = (torch.float16, torch.bfloat16)
# The head dims PyTorch's fused kernels take: flash up to 256, and flash, cuDNN and memory-efficient
# all want a multiple of 8 for 16-bit inputs (sdp_utils.cpp: check_head_dim_size_*).
_FLASH_MAX_HEAD_DIM = 256
_HALF_ALIGNMENT = 8


class _Plan(NamedTuple):
    """What `attention` runs for one (backend, device, dtype, head dim, masked) combination."""

    name: str  # the resolved backend: "flash", "sdpa" or "eager"
    kernels: tuple[SDPBackend, ...]  # SDPA kernels allowed (preferred first); () = not pinned


# (configured backend, device type, dtype, head dim, masked) -> plan. A plain dict, read by
# _plan() below: in eager the per-call cost is one lookup, and under torch.compile the lookup
# runs once at trace time (assume_constant_result), so it adds neither guards nor graph breaks.
_PLANS: dict[tuple[str, str, torch.dtype, int, bool], _Plan] = {}


@functools.lru_cache(maxsize=1)
def _flash_importable() -> bool:
    # find_spec, not import: a broken flash_attn build (wrong CUDA/torch ABI) must not take
    # down `import distrib`; the real import happens lazily in _flash_attn_module().
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=1)
def _flash_attn_module() -> Any:
    import flash_attn  # optional dependency: imported only when the flash backend runs

    return flash_attn


def resolve_backend(name: str, device_type: str) -> str:
    """Turn a configured backend name into the one that will run on `device_type`.

    "auto" picks "flash" when flash_attn is importable and the device is CUDA, else "sdpa".
    Asking for "flash" where it cannot run raises ValueError naming what is missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash" if device_type == "cuda" and _flash_importable() else "sdpa"
    if name == "flash":
        missing = []
        if not _flash_importable():
            missing.append("the flash_attn package is not installed (pip install 'distrib[flash]')")
        if device_type != "cuda":
            missing.append(f"flash attention needs a CUDA device, got '{device_type}'")
        if missing:
            raise ValueError(
                "attention backend 'flash' is unavailable: "
                + "; ".join(missing)
                + ". Use 'sdpa' or 'eager' (or 'auto' to pick the best available)."
            )
    return name


def attention(
    q_BHLK: Tensor,
    k_BGLK: Tensor,
    v_BGLK: Tensor,
    backend: str,
    doc_ids_BL: Tensor | None = None,
) -> Tensor:
    """Causal scaled dot-product attention; returns `[B, H, L, K]` in the dtype of q.

    `backend` is one of BACKENDS ("auto" resolves by q's device, cached). With `doc_ids_BL`
    (non-decreasing along L within a row), attention across documents is masked out.
    """
    H, G = q_BHLK.shape[1], k_BGLK.shape[1]
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if doc_ids_BL is not None and doc_ids_BL.shape != (q_BHLK.shape[0], q_BHLK.shape[2]):
        raise ValueError(
            f"doc_ids_BL shape {tuple(doc_ids_BL.shape)} must be [B, L] = "
            f"{(q_BHLK.shape[0], q_BHLK.shape[2])}"
        )
    masked = doc_ids_BL is not None
    plan = _plan(backend, q_BHLK.device.type, q_BHLK.dtype, q_BHLK.shape[-1], masked)
    if plan.name == "eager":
        return eager_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL)
    if plan.name == "sdpa":
        return sdpa_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL, plan.kernels)
    return flash_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL)


def sdpa_kernels(
    device_type: str, dtype: torch.dtype, head_dim: int, masked: bool
) -> list[SDPBackend]:
    """The SDPA kernels to pin to, most preferred first; an empty list means "do not pin".

    Off CUDA nothing is pinned (PyTorch's choice, and its numerics, stay as they are). On CUDA
    with 16-bit inputs: flash, then cuDNN, then memory-efficient without a document mask; with
    one (flash takes no mask) memory-efficient, then cuDNN. float32: memory-efficient, then math.
    Head dims no fused kernel takes are left to PyTorch rather than pinned to something slow.
    """
    if device_type != "cuda":
        return []
    if dtype == torch.float32:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if dtype not in _HALF or head_dim % _HALF_ALIGNMENT:
        return []
    if masked:
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if head_dim > _FLASH_MAX_HEAD_DIM:
        # Math as the last resort: memory-efficient takes GQA only in recent torch (#191085).
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ]


@torch.compiler.assume_constant_result
def _plan(backend: str, device_type: str, dtype: torch.dtype, head_dim: int, masked: bool) -> _Plan:
    # Under torch.compile this runs in Python at trace time and its result is baked in, so the
    # one-time log line below never sits in (or breaks) a compiled graph.
    key = (backend, device_type, dtype, head_dim, masked)
    plan = _PLANS.get(key)
    if plan is None:
        name = resolve_backend(backend, device_type)
        kernels = sdpa_kernels(device_type, dtype, head_dim, masked) if name == "sdpa" else []
        plan = _PLANS[key] = _Plan(name, tuple(kernels))
        log.info(describe_plan(plan, device_type, dtype, masked))
    return plan


def describe_plan(plan: _Plan, device_type: str, dtype: torch.dtype, masked: bool) -> str:
    """The one-line log of which attention kernel runs, e.g. for sdpa pinned on CUDA."""
    where = f"on {device_type} {str(dtype).removeprefix('torch.')}"
    if plan.name == "flash":
        version = getattr(_flash_attn_module(), "__version__", "?")
        layout = "varlen (packed documents)" if masked else "dense, causal"
        return f"attention: flash_attn {version} {layout} {where}"
    mask = "causal + document mask" if masked else "causal"
    if plan.name == "eager":
        return f"attention: eager {where}, {mask}, float32 softmax (reference; slow)"
    if not plan.kernels:
        return f"attention: sdpa {where}, {mask}, kernels chosen by PyTorch (not pinned)"
    sep = " > " if _SDPA_KERNEL_HAS_PRIORITY else " | "
    return f"attention: sdpa {where}, {mask}, kernels {sep.join(k.name for k in plan.kernels)}"


def causal_doc_mask(L: int, doc_ids_BL: Tensor | None, device: torch.device) -> Tensor:
    """Boolean "may attend" mask: `[L, L]` causal, or `[B, 1, L, L]` causal AND same document."""
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    if doc_ids_BL is None:
        return causal_LL
    same_doc_BLL = doc_ids_BL[:, :, None] == doc_ids_BL[:, None, :]
    return (same_doc_BLL & causal_LL)[:, None]


def _repeat_kv(x_BGLK: Tensor, n_rep: int) -> Tensor:
    # Each kv head serves n_rep consecutive query heads (the HF / Megatron GQA grouping).
    return x_BGLK if n_rep == 1 else x_BGLK.repeat_interleave(n_rep, dim=1)


def eager_attention(
    q_BHLK: Tensor, k_BGLK: Tensor, v_BGLK: Tensor, doc_ids_BL: Tensor | None = None
) -> Tensor:
    """Reference attention: explicit mask, float32 scores and softmax. Slow; for tests and debug."""
    n_rep = q_BHLK.shape[1] // k_BGLK.shape[1]
    k_BHLK = _repeat_kv(k_BGLK, n_rep).float()
    v_BHLK = _repeat_kv(v_BGLK, n_rep).float()
    scale = 1.0 / math.sqrt(q_BHLK.shape[-1])
    scores_BHLL = (q_BHLK.float() @ k_BHLK.transpose(-2, -1)) * scale
    allowed = causal_doc_mask(q_BHLK.shape[2], doc_ids_BL, q_BHLK.device)
    # Never a fully masked row: the diagonal is always allowed, so softmax stays finite.
    scores_BHLL = scores_BHLL.masked_fill(~allowed, float("-inf"))
    probs_BHLL = torch.softmax(scores_BHLL, dim=-1)
    return (probs_BHLL @ v_BHLK).to(q_BHLK.dtype)


def sdpa_attention(
    q_BHLK: Tensor,
    k_BGLK: Tensor,
    v_BGLK: Tensor,
    doc_ids_BL: Tensor | None = None,
    kernels: Sequence[SDPBackend] = (),
) -> Tensor:
    """PyTorch's fused attention; `is_causal` without doc ids, else a boolean `[B, 1, L, L]` mask.

    `kernels` (see `sdpa_kernels`) pins SDPA to those kernels, the first preferred where this
    torch supports priorities; empty leaves the choice to PyTorch.
    """
    n_rep = q_BHLK.shape[1] // k_BGLK.shape[1]
    kwargs: dict[str, Any] = {}
    if n_rep > 1:
        # Pinned with a mask, memory-efficient attention runs, which broadcasts kv heads itself
        # only in recent torch (pytorch#191085): repeat them, or no allowed kernel may run.
        if _SDPA_HAS_ENABLE_GQA and not (kernels and doc_ids_BL is not None):
            kwargs["enable_gqa"] = True
        else:
            k_BGLK, v_BGLK = _repeat_kv(k_BGLK, n_rep), _repeat_kv(v_BGLK, n_rep)
    if doc_ids_BL is None:
        # is_causal lets SDPA pick flash / memory-efficient kernels without materializing a mask.
        kwargs["is_causal"] = True
    else:
        kwargs["attn_mask"] = causal_doc_mask(q_BHLK.shape[2], doc_ids_BL, q_BHLK.device)
    if not kernels:
        return F.scaled_dot_product_attention(q_BHLK, k_BGLK, v_BGLK, **kwargs)
    if _SDPA_KERNEL_HAS_PRIORITY:
        pin = sdpa_kernel(list(kernels), set_priority=True)
    else:
        pin = sdpa_kernel(list(kernels))
    with pin:
        return F.scaled_dot_product_attention(q_BHLK, k_BGLK, v_BGLK, **kwargs)


def doc_cu_seqlens(doc_ids_BL: Tensor) -> tuple[Tensor, int]:
    """Cumulative document lengths over all rows flattened, for flash_attn's varlen API.

    Returns `cu_seqlens_S` (int32, starts with 0, ends with B * L) and the longest document.
    A document never spans two rows: every row start also starts a new segment.
    """
    B, L = doc_ids_BL.shape
    starts_BL = torch.ones_like(doc_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
    starts_T = starts_BL.flatten().nonzero().flatten()
    end = torch.tensor([B * L], device=doc_ids_BL.device, dtype=starts_T.dtype)
    cu_seqlens_S = torch.cat([starts_T, end]).to(torch.int32)
    # One host sync per forward: flash_attn needs max_seqlen as a Python int.
    max_seqlen = int((cu_seqlens_S[1:] - cu_seqlens_S[:-1]).max().item())
    return cu_seqlens_S, max_seqlen


def flash_attention(
    q_BHLK: Tensor, k_BGLK: Tensor, v_BGLK: Tensor, doc_ids_BL: Tensor | None = None
) -> Tensor:
    """flash_attn kernels (CUDA, fp16/bf16); varlen over documents when doc ids are given."""
    if q_BHLK.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"flash attention needs float16 or bfloat16 inputs, got {q_BHLK.dtype}; "
            "train with training.dtype = 'bfloat16' or use the 'sdpa' backend"
        )
    fa = _flash_attn_module()
    # flash_attn wants [B, L, H, K] and handles GQA natively (fewer kv heads).
    q_BLHK = q_BHLK.transpose(1, 2).contiguous()
    k_BLGK = k_BGLK.transpose(1, 2).contiguous()
    v_BLGK = v_BGLK.transpose(1, 2).contiguous()
    B, L, H, K = q_BLHK.shape
    if doc_ids_BL is None:
        out_BLHK = fa.flash_attn_func(q_BLHK, k_BLGK, v_BLGK, causal=True)
    else:
        cu_seqlens_S, max_seqlen = doc_cu_seqlens(doc_ids_BL)
        out_THK = fa.flash_attn_varlen_func(
            q_BLHK.reshape(B * L, H, K),
            k_BLGK.reshape(B * L, -1, K),
            v_BLGK.reshape(B * L, -1, K),
            cu_seqlens_q=cu_seqlens_S,
            cu_seqlens_k=cu_seqlens_S,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            causal=True,
        )
        out_BLHK = out_THK.reshape(B, L, H, K)
    return out_BLHK.transpose(1, 2)
