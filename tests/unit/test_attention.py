"""Unit tests for distrib.models.attention on CPU: kernel choice, its log line, numerics, dynamo.

Shape legend: B batch, L sequence, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention import SDPBackend

import distrib.models.attention as attn_mod
from distrib.models.attention import attention, sdpa_kernels
from tests.unit.test_model import random_qkv

FLASH = SDPBackend.FLASH_ATTENTION
CUDNN = SDPBackend.CUDNN_ATTENTION
EFFICIENT = SDPBackend.EFFICIENT_ATTENTION
MATH = SDPBackend.MATH
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no cached plan, so the first call resolves (and logs) again."""
    monkeypatch.setattr(attn_mod, "_PLANS", {})


DOC_IDS_BL = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [4] * 20 + [9] * 4])


@pytest.mark.parametrize(
    ("device_type", "dtype", "head_dim", "masked", "expected"),
    [
        # Off CUDA nothing is pinned, whatever the inputs.
        ("cpu", FP32, 64, False, []),
        ("cpu", BF16, 64, True, []),
        ("mps", FP16, 64, False, []),
        # 16-bit, no mask: flash, then cuDNN, then memory-efficient.
        ("cuda", BF16, 64, False, [FLASH, CUDNN, EFFICIENT]),
        ("cuda", FP16, 128, False, [FLASH, CUDNN, EFFICIENT]),
        ("cuda", BF16, 256, False, [FLASH, CUDNN, EFFICIENT]),
        # Beyond flash's 256: memory-efficient, math as the last resort.
        ("cuda", BF16, 512, False, [EFFICIENT, MATH]),
        # A document mask rules flash out.
        ("cuda", BF16, 64, True, [EFFICIENT, CUDNN]),
        ("cuda", FP16, 512, True, [EFFICIENT, CUDNN]),
        # No fused kernel takes a 16-bit head dim that is not a multiple of 8: left to PyTorch.
        ("cuda", BF16, 60, False, []),
        ("cuda", BF16, 60, True, []),
        # float32: memory-efficient or math, mask or not.
        ("cuda", FP32, 64, False, [EFFICIENT, MATH]),
        ("cuda", FP32, 60, True, [EFFICIENT, MATH]),
        # Other dtypes (fp8, fp64) are left to PyTorch.
        ("cuda", torch.float64, 64, False, []),
    ],
)
def test_sdpa_kernels(
    device_type: str, dtype: torch.dtype, head_dim: int, masked: bool, expected: list
) -> None:
    assert sdpa_kernels(device_type, dtype, head_dim, masked) == expected


def test_plan_is_cached_per_combination() -> None:
    q, k, v = random_qkv()
    attention(q, k, v, "sdpa")
    attention(q, k, v, "sdpa", DOC_IDS_BL)
    attention(q, k, v, "sdpa")
    attention(q, k, v, "eager")
    assert {
        ("sdpa", "cpu", FP32, 16, False, True): attn_mod._Plan("sdpa", ()),
        ("sdpa", "cpu", FP32, 16, True, True): attn_mod._Plan("sdpa", ()),
        ("eager", "cpu", FP32, 16, False, True): attn_mod._Plan("eager", ()),
    } == attn_mod._PLANS


def test_log_line_once_per_combination(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = random_qkv()
    caplog.set_level(logging.INFO, logger="distrib.attention")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "distrib.attention"]

    attention(q, k, v, "sdpa")
    assert lines() == [
        "attention: sdpa on cpu float32, causal, kernels chosen by PyTorch (not pinned)"
    ]
    attention(q, k, v, "sdpa")
    assert len(lines()) == 1
    attention(q, k, v, "auto", DOC_IDS_BL)
    attention(q, k, v, "auto", DOC_IDS_BL)
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "eager")
    assert lines()[1:] == [
        "attention: sdpa on cpu float32, causal + document mask, kernels chosen by PyTorch "
        "(not pinned)",
        "attention: eager on cpu bfloat16, causal, float32 softmax (reference; slow)",
    ]


@pytest.mark.parametrize("priority", [True, False])
def test_describe_pinned_plan(monkeypatch: pytest.MonkeyPatch, priority: bool) -> None:
    monkeypatch.setattr(attn_mod, "_SDPA_KERNEL_HAS_PRIORITY", priority)
    plan = attn_mod._Plan("sdpa", tuple(sdpa_kernels("cuda", BF16, 128, False)))
    sep = " > " if priority else " | "
    assert attn_mod.describe_plan(plan, "cuda", BF16, False) == (
        "attention: sdpa on cuda bfloat16, causal, kernels "
        + sep.join(["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
    )


@pytest.mark.parametrize("G", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
def test_cpu_sdpa_matches_eager(G: int, with_docs: bool) -> None:
    q, k, v = random_qkv(G=G)
    doc_ids_BL = DOC_IDS_BL if with_docs else None
    eager_BHLK = attention(q, k, v, "eager", doc_ids_BL)
    sdpa_BHLK = attention(q, k, v, "sdpa", doc_ids_BL)
    torch.testing.assert_close(sdpa_BHLK, eager_BHLK, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
def test_cpu_sdpa_is_unpinned_and_unchanged(with_docs: bool) -> None:
    """On CPU the sdpa backend is exactly a bare F.scaled_dot_product_attention call."""
    q, k, v = random_qkv(G=2)
    doc_ids_BL = DOC_IDS_BL if with_docs else None
    k_BHLK, v_BHLK = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    if with_docs:
        mask_B1LL = attn_mod.causal_doc_mask(q.shape[2], doc_ids_BL, q.device)
        ref_BHLK = torch.nn.functional.scaled_dot_product_attention(
            q, k_BHLK, v_BHLK, attn_mask=mask_B1LL
        )
    else:
        ref_BHLK = torch.nn.functional.scaled_dot_product_attention(
            q, k_BHLK, v_BHLK, is_causal=True
        )
    torch.testing.assert_close(attention(q, k, v, "sdpa", doc_ids_BL), ref_BHLK, rtol=0, atol=1e-6)


def graph_breaks(backend: str, doc_ids_BL: torch.Tensor | None) -> int:
    q, k, v = random_qkv(G=2)

    def fn(q_BHLK: torch.Tensor, k_BGLK: torch.Tensor, v_BGLK: torch.Tensor) -> torch.Tensor:
        return attention(q_BHLK, k_BGLK, v_BGLK, backend, doc_ids_BL) * 2

    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(q, k, v).graph_break_count
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
def test_sdpa_has_no_graph_breaks(with_docs: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A cold plan cache under torch.compile: resolving and logging happen at trace time."""
    caplog.set_level(logging.INFO, logger="distrib.attention")
    assert graph_breaks("sdpa", DOC_IDS_BL if with_docs else None) == 0
    assert any(r.name == "distrib.attention" for r in caplog.records)


@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
def test_pinned_sdpa_has_no_graph_breaks(with_docs: bool) -> None:
    """The CUDA path (sdpa_kernel around the call) traces whole; exercised on CPU with a plan
    that allows both CPU kernels, so the numerics are those of the unpinned call."""
    masked = with_docs
    attn_mod._PLANS[("sdpa", "cpu", FP32, 16, masked, True)] = attn_mod._Plan("sdpa", (FLASH, MATH))
    assert graph_breaks("sdpa", DOC_IDS_BL if with_docs else None) == 0
    q, k, v = random_qkv(G=2)
    doc_ids_BL = DOC_IDS_BL if with_docs else None
    torch.testing.assert_close(
        attention(q, k, v, "sdpa", doc_ids_BL),
        attention(q, k, v, "eager", doc_ids_BL),
        rtol=0,
        atol=1e-5,
    )
