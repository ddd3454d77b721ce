"""Attention backends on CUDA: every backend against a float32 reference, and the kernel that runs.

Shape legend: B batch, L sequence, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import distrib.models.attention as attn_mod
from distrib.models.attention import attention, eager_attention, sdpa_attention, sdpa_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, H, G = 2, 8, 2  # grouped-query: 4 query heads per kv head
REL_TOL = 1e-2  # bfloat16 keeps 8 mantissa bits: about 4e-3 relative per rounding
FUSED_OPS = {
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_efficient_attention",
}
MATH_OP = "aten::_scaled_dot_product_attention_math"
FUSED_KERNEL_MARKERS = ("flash", "cudnn", "fmha", "efficient", "memeff", "sdpa")


@pytest.fixture(autouse=True)
def exact_float32_matmul() -> Iterator[None]:
    """The float32 reference must not run its matmuls in TF32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def inputs(L: int, K: int, masked: bool) -> tuple:
    """bfloat16 q, k, v on CUDA and, if masked, doc ids: row 0 has four documents, row 1 one."""
    g = torch.Generator().manual_seed(L + K)
    q_BHLK, k_BGLK, v_BGLK = (
        torch.randn(B, n, L, K, generator=g).to("cuda", torch.bfloat16) for n in (H, G, G)
    )
    doc_ids_BL = None
    if masked:
        starts = torch.tensor([L // 8, L // 8 + L // 3, 3 * L // 4])
        row0_L = torch.bucketize(torch.arange(L), starts, right=True)
        doc_ids_BL = torch.stack([row0_L, torch.full((L,), 7)]).cuda()
    return q_BHLK, k_BGLK, v_BGLK, doc_ids_BL


def reference(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL) -> torch.Tensor:
    """Eager attention in float32 on the same (bfloat16-rounded) inputs."""
    return eager_attention(q_BHLK.float(), k_BGLK.float(), v_BGLK.float(), doc_ids_BL)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run(variant: str, q_BHLK, k_BGLK, v_BGLK, doc_ids_BL) -> torch.Tensor:
    if variant == "sdpa_unpinned":
        return sdpa_attention(q_BHLK, k_BGLK, v_BGLK, doc_ids_BL)
    backend = "sdpa" if variant == "sdpa_pinned" else variant
    return attention(q_BHLK, k_BGLK, v_BGLK, backend, doc_ids_BL)


@pytest.mark.parametrize("L", [256, 1024])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "docs"])
@pytest.mark.parametrize("variant", ["flash", "sdpa_pinned", "sdpa_unpinned", "eager"])
def test_backend_matches_float32_reference(variant: str, masked: bool, K: int, L: int) -> None:
    if variant == "flash" and not attn_mod._flash_importable():
        pytest.skip("flash_attn is not installed")
    if variant == "sdpa_pinned":
        assert sdpa_kernels("cuda", torch.bfloat16, K, masked), "expected a pinned kernel list"
    q, k, v, doc_ids_BL = inputs(L, K, masked)
    out_BHLK = run(variant, q, k, v, doc_ids_BL)
    assert out_BHLK.shape == q.shape and out_BHLK.dtype == torch.bfloat16
    err = rel_err(out_BHLK, reference(q, k, v, doc_ids_BL))
    assert err < REL_TOL, f"{variant}: relative error {err:.2e}"


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "docs"])
def test_pinned_sdpa_backward_matches_float32_reference(masked: bool, K: int) -> None:
    """The pinned kernels must also train: gradients close to the float32 reference's."""
    q, k, v, doc_ids_BL = inputs(256, K, masked)
    grads = []
    for fn, dtype in ((lambda *t: run("sdpa_pinned", *t), torch.bfloat16), (reference, None)):
        leaves = [t.detach().to(dtype or torch.float32).requires_grad_() for t in (q, k, v)]
        out_BHLK = fn(*leaves, doc_ids_BL)
        dout_BHLK = torch.randn(out_BHLK.shape, generator=torch.Generator().manual_seed(1))
        # Rounded to bfloat16 for both runs, so only the kernels differ.
        out_BHLK.backward(dout_BHLK.bfloat16().to(out_BHLK))
        grads.append([t.grad for t in leaves])
    for name, got, ref in zip("qkv", *grads, strict=True):
        err = rel_err(got, ref)
        assert err < 2 * REL_TOL, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "docs"])
def test_pinned_sdpa_runs_a_fused_kernel(masked: bool, K: int) -> None:
    """The profiler shows a flash / cuDNN / memory-efficient kernel, never the math fallback."""
    q, k, v, doc_ids_BL = inputs(1024, K, masked)
    attention(q, k, v, "sdpa", doc_ids_BL)  # warm-up: plan, cuDNN graph build
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        attention(q, k, v, "sdpa", doc_ids_BL)
        torch.cuda.synchronize()
    events = prof.events()
    ops = {e.name for e in events if e.name.startswith("aten::_scaled_dot_product")}
    assert MATH_OP not in ops, f"math fallback ran: {sorted(ops)}"
    assert ops & FUSED_OPS, f"no fused SDPA op ran: {sorted(ops)}"
    kernels = [e.name for e in events if e.device_type == DeviceType.CUDA]
    fused = [n for n in kernels if any(m in n.lower() for m in FUSED_KERNEL_MARKERS)]
    assert fused, f"no fused attention kernel among CUDA kernels: {kernels}"
