"""Causal attention backends: flash_attn (when importable, CUDA), PyTorch SDPA, and an eager reference.

All backends take `[B, H, L, K]` queries and `[B, Hkv, L, K]` keys/values (grouped-query attention:
H is a multiple of Hkv), are always causal, and optionally mask attention across documents of a
packed sequence (`doc_ids_BL`: a token attends only to earlier tokens with the same doc id) and
beyond a sliding window (`window`: position i sees j with i - window < j; the masks are in
`distrib.models.masks`).

Shape legend: B batch, L sequence, H query heads, G kv heads (Hkv), K head dim, T total tokens
(B * L, flattened for varlen flash), S number of documents (segments) + 1.

On CUDA the sdpa backend is pinned to PyTorch's fused kernels where dtype and head dim allow
(`sdpa_kernels`), so it does not drop silently to the math kernel; grouped kv heads go in with
enable_gqa only where the kernel pinned first takes it, else repeated (`gqa_by_repeat`). Which
kernels run is logged once per combination on the "distrib.attention" logger. With flash_attn,
the model computes the documents' varlen layout once per forward (`document_segments`).
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
from torch.torch_version import TorchVersion

from distrib.models.masks import causal_doc_mask, flash_window_size

BACKENDS = ("auto", "flash", "sdpa", "cudnn", "eager")

log = logging.getLogger("distrib.attention")

# The builtin has no inspectable signature; its docstring carries it. enable_gqa (torch >= 2.5)
# lets SDPA broadcast kv heads without materializing the repeated copies.
_SDPA_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
# Without set_priority, sdpa_kernel only allows the listed kernels and SDPA tries them in its own
# global order; with it, the list order is the preference.
_SDPA_KERNEL_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

_HALF = (torch.float16, torch.bfloat16)
# The head dims PyTorch's fused kernels take: flash up to 256, and flash, cuDNN and memory-efficient
# all want a multiple of 8 for 16-bit inputs (sdp_utils.cpp: check_head_dim_size_*). flash_attn
# itself also stops at 256 (and pads other dims to a multiple of 8 itself).
_FLASH_MAX_HEAD_DIM = 256
_HALF_ALIGNMENT = 8
# flash_attn 2 runs on Ampere (sm80) and newer only.
_FLASH_MIN_CAPABILITY = (8, 0)

# Which SDPA kernels broadcast kv heads themselves under enable_gqa. Flash and cuDNN do (their
# dense checks pass supports_gqa=true); the memory-efficient kernel does not, up to and including
# torch 2.13: its dense check is check_batch_size_and_num_heads_dense<false /*supports_gqa*/> in
# aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, and the sdp_utils_cpp.h that torch 2.13
# ships still has that template without the supports_mqa parameter of pytorch#191085 ("Add
# memory-efficient GQA", merged after the 2.13 branch), the change that sets it to true. So with
# enable_gqa and fewer kv heads a memory-efficient kernel pinned first refuses, and SDPA quietly
# falls to the next allowed kernel (math). 2.14 is the first release that can hold that change;
# its dev and source builds (2.14.0.devN, 2.14.0a0) count as older, so they repeat kv heads
# rather than guess. To check the gate on a GPU: torch._fused_sdp_choice with enable_gqa=True
# and fewer kv heads, under sdpa_kernel([EFFICIENT_ATTENTION]), picks that kernel or none.
_EFFICIENT_GQA_MIN_TORCH = (2, 14)
_TORCH_VERSION = str(torch.__version__)


class _Plan(NamedTuple):
    """What `attention` runs for one (backend, device, dtype, head dim, masked, gqa) combination."""

    name: str  # the resolved backend: "flash", "sdpa" or "eager"
    kernels: tuple[SDPBackend, ...]  # SDPA kernels allowed (preferred first); () = not pinned


class DocSegments(NamedTuple):
    """Document ids with flash_attn's varlen layout of them, made once per forward by
    `document_segments`, so that no attention layer has to compute it (a host sync) itself."""

    doc_ids_BL: Tensor
    cu_seqlens_S: Tensor  # int32, see `cu_seqlens`


# (configured backend, device type, dtype, head dim, masked, gqa) -> plan. A plain dict, read by
# _plan() below: in eager the per-call cost is one lookup, and under torch.compile the lookup
# runs once at trace time (assume_constant_result), so it adds neither guards nor graph breaks.
_PLANS: dict[tuple[str, str, torch.dtype, int, bool, bool], _Plan] = {}


@functools.lru_cache(maxsize=1)
def _flash_importable() -> bool:
    # find_spec, not import: a broken flash_attn build (wrong CUDA/torch ABI) must not take
    # down `import distrib`; the real import happens lazily in _flash_attn_module().
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=1)
def _flash_attn_module() -> Any:
    import flash_attn  # optional dependency: imported only when the flash backend runs

    return flash_attn


def _old_gpu() -> str | None:
    """The current GPU, described, when it is older than flash_attn supports."""
    if not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    if capability >= _FLASH_MIN_CAPABILITY:
        return None
    return f"{torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]})"


def flash_unsupported(
    device_type: str, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> list[str]:
    """Why flash_attn cannot run attention on `device_type` with inputs of `dtype` and
    `head_dim` (None: not checked), one reason each; empty when it can."""
    missing = []
    if not _flash_importable():
        missing.append("the flash_attn package is not installed (pip install 'distrib[flash]')")
    if device_type != "cuda":
        missing.append(f"flash attention needs a CUDA device, got '{device_type}'")
    elif (gpu := _old_gpu()) is not None:
        missing.append(f"flash attention needs an Ampere or newer GPU (sm80+), got {gpu}")
    if dtype is not None and dtype not in _HALF:
        missing.append(
            f"flash attention needs float16 or bfloat16 inputs, got {dtype} "
            "(training.dtype = 'bfloat16')"
        )
    if head_dim is not None and not 0 < head_dim <= _FLASH_MAX_HEAD_DIM:
        missing.append(f"flash attention takes head dims up to 256, got {head_dim}")
    return missing


def resolve_backend(
    name: str, device_type: str, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """Turn a configured backend name into the one that will run on `device_type` for inputs
    of `dtype` and `head_dim` (None: not known yet, not checked).

    "auto" picks "flash" where flash_attn can run (`flash_unsupported` finds nothing: importable,
    a CUDA GPU of sm80+, 16-bit inputs, head dim <= 256), else "sdpa". Asking for "flash" where
    it cannot run raises ValueError naming what is missing.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        return "sdpa" if flash_unsupported(device_type, dtype, head_dim) else "flash"
    if name == "cudnn" and (device_type != "cuda" or (dtype is not None and dtype not in _HALF)):
        raise ValueError(
            f"attention backend 'cudnn' (SDPA pinned to cuDNN first) needs a CUDA device and "
            f"bfloat16 or float16 inputs, got '{device_type}'"
            + (f" {dtype}" if dtype is not None else "")
            + ". Use 'sdpa' or 'auto'."
        )
    if name == "flash":
        missing = flash_unsupported(device_type, dtype, head_dim)
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
    doc_ids_BL: Tensor | DocSegments | None = None,
    window: int = 0,
) -> Tensor:
    """Causal scaled dot-product attention; returns `[B, H, L, K]` in the dtype of q.

    `backend` is one of BACKENDS ("auto" resolves by q's device, dtype and head dim, cached).
    With `doc_ids_BL` (non-decreasing along L within a row; or `DocSegments` holding them),
    attention across documents is masked out; with `window > 0`, so is attention to positions
    `window` or more before the query.
    """
    cu_seqlens_S = None
    if isinstance(doc_ids_BL, DocSegments):
        doc_ids_BL, cu_seqlens_S = doc_ids_BL
    H, G = q_BHLK.shape[1], k_BGLK.shape[1]
    if H % G:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({G})")
    if doc_ids_BL is not None and doc_ids_BL.shape != (q_BHLK.shape[0], q_BHLK.shape[2]):
        raise ValueError(
            f"doc_ids_BL shape {tuple(doc_ids_BL.shape)} must be [B, L] = "
            f"{(q_BHLK.shape[0], q_BHLK.shape[2])}"
        )
    # A window needs an explicit mask on SDPA, which rules out its flash kernel like doc ids do.
    masked = doc_ids_BL is not None or window > 0
    plan = _plan(backend, q_BHLK.device.type, q_BHLK.dtype, q_BHLK.shape[-1], masked, H != G)
    if plan.name == "eager":
        return eager_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL, window)
    if plan.name == "sdpa":
        return sdpa_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL, plan.kernels, window)
    return flash_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL, cu_seqlens_S, window)


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
        # Math as the last resort, for what memory-efficient refuses (alignment, see above).
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ]


def kernel_takes_gqa(kernel: SDPBackend) -> bool:
    """Whether SDPA `kernel` broadcasts kv heads itself (`enable_gqa`) in this torch; see
    _EFFICIENT_GQA_MIN_TORCH for the memory-efficient kernel."""
    if not _SDPA_HAS_ENABLE_GQA:
        return False
    if kernel == SDPBackend.EFFICIENT_ATTENTION:
        return TorchVersion(_TORCH_VERSION) >= _EFFICIENT_GQA_MIN_TORCH
    return True


def gqa_by_repeat(kernels: Sequence[SDPBackend]) -> bool:
    """Whether grouped kv heads are repeated before SDPA, rather than passed with `enable_gqa`:
    when this torch has no enable_gqa, or the kernel pinned first does not take it (it would
    refuse the call and SDPA would run the next kernel allowed, without a word)."""
    if not _SDPA_HAS_ENABLE_GQA:
        return True
    return bool(kernels) and not kernel_takes_gqa(kernels[0])


def _sdpa_plan(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    masked: bool,
    gqa: bool,
    cudnn_first: bool = False,
) -> _Plan:
    kernels = sdpa_kernels(device_type, dtype, head_dim, masked)
    if cudnn_first and SDPBackend.CUDNN_ATTENTION in kernels:
        # On Hopper cuDNN's fused attention is often faster than FlashAttention-2 (head dim
        # 128, causal, bf16): the 'cudnn' backend tries it first, the rest as 'sdpa' orders.
        kernels.remove(SDPBackend.CUDNN_ATTENTION)
        kernels.insert(0, SDPBackend.CUDNN_ATTENTION)
    if gqa and not gqa_by_repeat(kernels):
        # enable_gqa: the kernels that would refuse it can never run, so they are not pinned
        # (nor named in the log).
        kernels = [k for k in kernels if kernel_takes_gqa(k)]
    return _Plan("sdpa", tuple(kernels))


@torch.compiler.assume_constant_result
def _plan(
    backend: str, device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, gqa: bool
) -> _Plan:
    # Under torch.compile this runs in Python at trace time and its result is baked in, so the
    # one-time log line below never sits in (or breaks) a compiled graph.
    key = (backend, device_type, dtype, head_dim, masked, gqa)
    plan = _PLANS.get(key)
    if plan is None:
        name = resolve_backend(backend, device_type, dtype, head_dim)
        if name in ("sdpa", "cudnn"):
            plan = _sdpa_plan(device_type, dtype, head_dim, masked, gqa, name == "cudnn")
        else:
            plan = _Plan(name, ())
        _PLANS[key] = plan
        line = describe_plan(plan, device_type, dtype, masked, gqa)
        if backend == "auto" and name != "flash" and _flash_importable():
            reasons = flash_unsupported(device_type, dtype, head_dim)
            line += f" (auto passed over flash_attn: {'; '.join(reasons)})"
        log.info(line)
    return plan


def describe_plan(
    plan: _Plan, device_type: str, dtype: torch.dtype, masked: bool, gqa: bool = False
) -> str:
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
    line = f"attention: sdpa {where}, {mask}, kernels {sep.join(k.name for k in plan.kernels)}"
    if gqa and gqa_by_repeat(plan.kernels):
        first = plan.kernels[0].name
        return f"{line}; kv heads repeated ({first} takes no enable_gqa in torch {_TORCH_VERSION})"
    return f"{line}; kv heads broadcast by enable_gqa" if gqa else line


def _repeat_kv(x_BGLK: Tensor, n_rep: int) -> Tensor:
    # Each kv head serves n_rep consecutive query heads (the HF / Megatron GQA grouping).
    return x_BGLK if n_rep == 1 else x_BGLK.repeat_interleave(n_rep, dim=1)


def eager_attention(
    q_BHLK: Tensor,
    k_BGLK: Tensor,
    v_BGLK: Tensor,
    doc_ids_BL: Tensor | None = None,
    window: int = 0,
) -> Tensor:
    """Reference attention: explicit mask, float32 scores and softmax. Slow; for tests and debug."""
    n_rep = q_BHLK.shape[1] // k_BGLK.shape[1]
    k_BHLK = _repeat_kv(k_BGLK, n_rep).float()
    v_BHLK = _repeat_kv(v_BGLK, n_rep).float()
    scale = 1.0 / math.sqrt(q_BHLK.shape[-1])
    scores_BHLL = (q_BHLK.float() @ k_BHLK.transpose(-2, -1)) * scale
    allowed = causal_doc_mask(q_BHLK.shape[2], doc_ids_BL, q_BHLK.device, window)
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
    window: int = 0,
) -> Tensor:
    """PyTorch's fused attention; `is_causal` without doc ids or window, else a boolean mask
    (`[L, L]`, or `[B, 1, L, L]` with doc ids; see `causal_doc_mask`).

    `kernels` (see `sdpa_kernels`) pins SDPA to those kernels, the first preferred where this
    torch supports priorities; empty leaves the choice to PyTorch. Grouped kv heads go in with
    `enable_gqa`, unless the first kernel does not take it (`gqa_by_repeat`).
    """
    n_rep = q_BHLK.shape[1] // k_BGLK.shape[1]
    kwargs: dict[str, Any] = {}
    if n_rep > 1:
        if gqa_by_repeat(kernels):
            k_BGLK, v_BGLK = _repeat_kv(k_BGLK, n_rep), _repeat_kv(v_BGLK, n_rep)
        else:
            kwargs["enable_gqa"] = True
    if doc_ids_BL is None and window <= 0:
        # is_causal lets SDPA pick flash / memory-efficient kernels without materializing a mask.
        kwargs["is_causal"] = True
    else:
        L = q_BHLK.shape[2]
        kwargs["attn_mask"] = causal_doc_mask(L, doc_ids_BL, q_BHLK.device, window)
    if not kernels:
        return F.scaled_dot_product_attention(q_BHLK, k_BGLK, v_BGLK, **kwargs)
    if _SDPA_KERNEL_HAS_PRIORITY:
        pin = sdpa_kernel(list(kernels), set_priority=True)
    else:
        pin = sdpa_kernel(list(kernels))
    with pin:
        return F.scaled_dot_product_attention(q_BHLK, k_BGLK, v_BGLK, **kwargs)


def cu_seqlens(doc_ids_BL: Tensor) -> Tensor:
    """Cumulative document lengths over all rows flattened, for flash_attn's varlen API:
    `cu_seqlens_S`, int32, starting with 0 and ending with B * L. A document never spans two
    rows: every row start also starts a new segment. Its length depends on the data, so on a GPU
    this waits for the device (nonzero): `document_segments` calls it once per forward."""
    B, L = doc_ids_BL.shape
    starts_BL = torch.ones_like(doc_ids_BL, dtype=torch.bool)
    starts_BL[:, 1:] = doc_ids_BL[:, 1:] != doc_ids_BL[:, :-1]
    starts_T = starts_BL.flatten().nonzero().flatten()
    end = torch.tensor([B * L], device=doc_ids_BL.device, dtype=starts_T.dtype)
    return torch.cat([starts_T, end]).to(torch.int32)


def doc_cu_seqlens(doc_ids_BL: Tensor) -> tuple[Tensor, int]:
    """`cu_seqlens(doc_ids_BL)` and the longest document (a second host sync, for its value)."""
    cu_seqlens_S = cu_seqlens(doc_ids_BL)
    return cu_seqlens_S, int((cu_seqlens_S[1:] - cu_seqlens_S[:-1]).max().item())


def document_segments(
    doc_ids_BL: Tensor | DocSegments | None, backend: str
) -> Tensor | DocSegments | None:
    """What a model's attention layers take for `doc_ids_BL`, made once per forward: where
    `backend` may run flash_attn on the ids' device, `DocSegments` with the varlen layout (one
    host sync, here instead of in every layer and outside any compiled block); else the ids."""
    if not isinstance(doc_ids_BL, Tensor) or backend not in ("flash", "auto"):
        return doc_ids_BL
    if flash_unsupported(doc_ids_BL.device.type):
        return doc_ids_BL
    return DocSegments(doc_ids_BL, cu_seqlens(doc_ids_BL))


def flash_attention(
    q_BHLK: Tensor,
    k_BGLK: Tensor,
    v_BGLK: Tensor,
    doc_ids_BL: Tensor | None = None,
    cu_seqlens_S: Tensor | None = None,
    window: int = 0,
) -> Tensor:
    """flash_attn kernels (CUDA, fp16/bf16); varlen over documents when doc ids are given,
    with their `cu_seqlens_S` if already computed (see `document_segments`); a sliding
    `window` goes in as flash_attn's own `window_size` (see `flash_window_size`)."""
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
    # Passed only with a window, so flash_attn builds older than window_size (< 2.3) still run.
    extra: dict[str, Any] = {"window_size": flash_window_size(window)} if window > 0 else {}
    if doc_ids_BL is None:
        out_BLHK = fa.flash_attn_func(q_BLHK, k_BLGK, v_BLGK, causal=True, **extra)
    else:
        if cu_seqlens_S is None:
            cu_seqlens_S = cu_seqlens(doc_ids_BL)
        # max_seqlen is an upper bound (it sizes the launch grid; thread blocks past a
        # document's end return at once), and L bounds every document since none spans rows.
        # The exact maximum would cost a host sync and, as a Python int that changes from batch
        # to batch, a recompile of each compiled block.
        out_THK = fa.flash_attn_varlen_func(
            q_BLHK.reshape(B * L, H, K),
            k_BLGK.reshape(B * L, -1, K),
            v_BLGK.reshape(B * L, -1, K),
            cu_seqlens_q=cu_seqlens_S,
            cu_seqlens_k=cu_seqlens_S,
            max_seqlen_q=L,
            max_seqlen_k=L,
            causal=True,
            **extra,
        )
        out_BLHK = out_THK.reshape(B, L, H, K)
    return out_BLHK.transpose(1, 2)
