"""The CUDA attention paths, decided and exercised on CPU with fakes: which backend "auto"
resolves to (flash only where flash_attn runs), how SDPA gets grouped kv heads (enable_gqa, or
repeated where the pinned kernel does not take it), and flash's varlen layout computed once per
forward. (Their counterparts on a real GPU belong in tests/gpu, where bench/run_gpu.sh looks.)

Shape legend: B batch, L sequence, H query heads, G kv heads, K head dim, T tokens (B * L).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

import distrib.models.attention as attn_mod
from distrib.models.attention import (
    DocSegments,
    attention,
    document_segments,
    eager_attention,
    gqa_by_repeat,
    kernel_takes_gqa,
    resolve_backend,
)
from distrib.models.transformer import Transformer
from tests.support.tiny import tiny_config
from tests.unit.test_model import random_qkv

FLASH = SDPBackend.FLASH_ATTENTION
CUDNN = SDPBackend.CUDNN_ATTENTION
EFFICIENT = SDPBackend.EFFICIENT_ATTENTION
MATH = SDPBackend.MATH
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DOC_IDS_BL = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [4] * 20 + [9] * 4])


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_PLANS", {})


@pytest.fixture
def flash_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash_attn importable; no GPU to ask for its compute capability."""
    monkeypatch.setattr(attn_mod, "_flash_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distrib.attention"]


# --- "auto" picks flash only where flash_attn can run ---------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "head_dim", "expected"),
    [
        (BF16, 128, "flash"),
        (FP16, 64, "flash"),
        (BF16, 256, "flash"),
        (BF16, 60, "flash"),  # flash_attn pads head dims to a multiple of 8 itself
        (FP32, 128, "sdpa"),  # flash_attn refuses float32
        (torch.float64, 64, "sdpa"),
        (BF16, 512, "sdpa"),  # beyond flash_attn's 256
    ],
)
def test_auto_picks_flash_only_where_it_runs(
    flash_installed: None, dtype: torch.dtype, head_dim: int, expected: str
) -> None:
    assert resolve_backend("auto", "cuda", dtype, head_dim) == expected
    assert resolve_backend("auto", "cpu", dtype, head_dim) == "sdpa"


def test_auto_passes_over_flash_on_a_pre_ampere_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_flash_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert resolve_backend("auto", "cuda", BF16, 128) == "sdpa"
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\)"):
        resolve_backend("flash", "cuda", BF16, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert resolve_backend("auto", "cuda", BF16, 128) == "flash"


def test_flash_asked_for_with_float32_fails_at_plan_time(flash_installed: None) -> None:
    with pytest.raises(ValueError, match=r"float16 or bfloat16 inputs, got torch.float32"):
        resolve_backend("flash", "cuda", FP32, 64)


def test_auto_float32_with_flash_installed_plans_sdpa_and_says_why(
    flash_installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What crashed at the first forward: auto planned flash_attn for float32 inputs."""
    caplog.set_level(logging.INFO, logger="distrib.attention")
    plan = attn_mod._plan("auto", "cuda", FP32, 64, False, False)
    assert plan == attn_mod._Plan("sdpa", (EFFICIENT, MATH))
    (line,) = log_lines(caplog)
    assert line.startswith("attention: sdpa on cuda float32, causal, kernels EFFICIENT_ATTENTION")
    assert line.endswith(
        "(auto passed over flash_attn: flash attention needs float16 or bfloat16 "
        "inputs, got torch.float32 (training.dtype = 'bfloat16'))"
    )


# --- grouped kv heads: enable_gqa only for kernels that take it ---------------------------------


@pytest.mark.parametrize(
    ("version", "efficient_gqa"),
    [
        ("2.11.0+cu126", False),
        ("2.12.1", False),
        ("2.13.0+cu128", False),
        ("2.14.0.dev20260801+cu128", False),  # a nightly may predate pytorch#191085
        ("2.14.0a0+git0123abc", False),  # a source build, likewise
        ("2.14.0+cu128", True),
        ("2.15.1", True),
    ],
)
def test_which_kernels_take_enable_gqa(
    monkeypatch: pytest.MonkeyPatch, version: str, efficient_gqa: bool
) -> None:
    monkeypatch.setattr(attn_mod, "_TORCH_VERSION", version)
    assert kernel_takes_gqa(EFFICIENT) is efficient_gqa
    assert kernel_takes_gqa(FLASH) and kernel_takes_gqa(CUDNN) and kernel_takes_gqa(MATH)
    assert gqa_by_repeat([EFFICIENT, MATH]) is not efficient_gqa
    assert gqa_by_repeat([EFFICIENT, CUDNN]) is not efficient_gqa
    assert not gqa_by_repeat([FLASH, CUDNN, EFFICIENT])
    assert not gqa_by_repeat([])  # not pinned: PyTorch's choice, with enable_gqa


REPEATED = "kv heads repeated (EFFICIENT_ATTENTION takes no enable_gqa in torch 2.13.0)"
BROADCAST = "kv heads broadcast by enable_gqa"


@pytest.mark.parametrize(
    ("version", "dtype", "head_dim", "masked", "kernels", "gqa_note"),
    [
        # The bug: float32 pinned to memory-efficient got enable_gqa, so math ran, unlogged.
        ("2.13.0", FP32, 64, False, (EFFICIENT, MATH), REPEATED),
        ("2.13.0", BF16, 64, True, (EFFICIENT, CUDNN), REPEATED),
        ("2.13.0", BF16, 512, False, (EFFICIENT, MATH), REPEATED),
        # Flash first takes enable_gqa; memory-efficient, which would refuse it, is not pinned.
        ("2.13.0", BF16, 128, False, (FLASH, CUDNN), BROADCAST),
        ("2.14.0", FP32, 64, False, (EFFICIENT, MATH), BROADCAST),
        ("2.14.0", BF16, 64, True, (EFFICIENT, CUDNN), BROADCAST),
        ("2.14.0", BF16, 128, False, (FLASH, CUDNN, EFFICIENT), BROADCAST),
    ],
)
def test_gqa_plan_and_its_log_line(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    version: str,
    dtype: torch.dtype,
    head_dim: int,
    masked: bool,
    kernels: tuple[SDPBackend, ...],
    gqa_note: str,
) -> None:
    caplog.set_level(logging.INFO, logger="distrib.attention")
    monkeypatch.setattr(attn_mod, "_TORCH_VERSION", version)
    monkeypatch.setattr(attn_mod, "_SDPA_KERNEL_HAS_PRIORITY", True)
    assert attn_mod._plan("sdpa", "cuda", dtype, head_dim, masked, True).kernels == kernels
    # Without grouped heads nothing changes: the kernels sdpa_kernels lists, no note.
    mha = attn_mod._plan("sdpa", "cuda", dtype, head_dim, masked, False)
    assert list(mha.kernels) == attn_mod.sdpa_kernels("cuda", dtype, head_dim, masked)
    where = f"on cuda {str(dtype).removeprefix('torch.')}"
    mask = "causal + document mask" if masked else "causal"
    gqa_line, mha_line = log_lines(caplog)
    assert gqa_line == (
        f"attention: sdpa {where}, {mask}, kernels {' > '.join(k.name for k in kernels)}; "
        + gqa_note.replace("2.13.0", version)
    )
    assert mha_line == (
        f"attention: sdpa {where}, {mask}, kernels {' > '.join(k.name for k in mha.kernels)}"
    )


@pytest.mark.parametrize(
    ("version", "kernels", "repeats"),
    [
        ("2.13.0", (EFFICIENT, MATH), True),
        ("2.13.0", (EFFICIENT, CUDNN), True),
        ("2.14.0", (EFFICIENT, MATH), False),
        ("2.13.0", (FLASH, CUDNN), False),
        ("2.13.0", (), False),
    ],
)
def test_sdpa_gets_repeated_kv_heads_only_for_a_kernel_without_gqa(
    monkeypatch: pytest.MonkeyPatch,
    version: str,
    kernels: tuple[SDPBackend, ...],
    repeats: bool,
) -> None:
    monkeypatch.setattr(attn_mod, "_TORCH_VERSION", version)
    seen: dict = {}

    def spy(q_BHLK: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
        seen.update(kv_heads=(k.shape[1], v.shape[1]), **kwargs)
        return torch.zeros_like(q_BHLK)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = random_qkv(H=4, G=2)
    attn_mod.sdpa_attention(q, k, v, None, kernels)
    assert seen["kv_heads"] == ((4, 4) if repeats else (2, 2))
    assert seen.get("enable_gqa", False) is not repeats


@pytest.mark.parametrize("version", ["2.13.0", "2.14.0"])
@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
def test_pinned_gqa_matches_eager(
    monkeypatch: pytest.MonkeyPatch, version: str, with_docs: bool
) -> None:
    """Pinned to memory-efficient, then math (the CPU has only math of the two), with kv heads
    repeated (2.13) or broadcast (2.14): the reference's numbers either way."""
    monkeypatch.setattr(attn_mod, "_TORCH_VERSION", version)
    plan = attn_mod._Plan("sdpa", (EFFICIENT, MATH))
    attn_mod._PLANS[("sdpa", "cpu", FP32, 16, with_docs, True)] = plan
    q, k, v = random_qkv(G=2)
    doc_ids_BL = DOC_IDS_BL if with_docs else None
    torch.testing.assert_close(
        attention(q, k, v, "sdpa", doc_ids_BL),
        eager_attention(q, k, v, doc_ids_BL),
        rtol=0,
        atol=1e-5,
    )


# --- flash varlen: the documents' layout once per forward ---------------------------------------


class FakeFlashAttn:
    """flash_attn's two entry points, computed by the eager reference; remembers varlen calls."""

    __version__ = "fake"

    def __init__(self) -> None:
        self.varlen_calls: list[tuple[Tensor, int]] = []

    def flash_attn_func(self, q_BLHK: Tensor, k_BLGK: Tensor, v_BLGK: Tensor, causal: bool):
        assert causal
        q, k, v = (t.transpose(1, 2) for t in (q_BLHK, k_BLGK, v_BLGK))
        return eager_attention(q, k, v).transpose(1, 2)

    def flash_attn_varlen_func(
        self,
        q_THK: Tensor,
        k_TGK: Tensor,
        v_TGK: Tensor,
        *,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        causal: bool,
    ) -> Tensor:
        assert causal and cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q
        assert isinstance(max_seqlen_q, int) and cu_seqlens_q.dtype == torch.int32
        self.varlen_calls.append((cu_seqlens_q, max_seqlen_q))
        out_THK = torch.empty_like(q_THK)
        bounds = cu_seqlens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            assert 0 < end - start <= max_seqlen_q
            q, k, v = (t[start:end].transpose(0, 1)[None] for t in (q_THK, k_TGK, v_TGK))
            out_THK[start:end] = eager_attention(q, k, v)[0].transpose(0, 1)
        return out_THK


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeFlashAttn, list[Tensor]]:
    """flash_attn faked, on a CPU that stands in for a GPU; the list collects every
    computation of cu_seqlens."""
    fake = FakeFlashAttn()
    monkeypatch.setattr(attn_mod, "_flash_attn_module", lambda: fake)
    monkeypatch.setattr(attn_mod, "flash_unsupported", lambda *args: [])
    computed: list[Tensor] = []
    real = attn_mod.cu_seqlens

    def counted(doc_ids_BL: Tensor) -> Tensor:
        computed.append(doc_ids_BL)
        return real(doc_ids_BL)

    monkeypatch.setattr(attn_mod, "cu_seqlens", counted)
    return fake, computed


def test_document_segments_only_where_flash_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    ids_BL = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2]])
    assert document_segments(None, "auto") is None
    assert document_segments(ids_BL, "auto") is ids_BL  # on the CPU: flash cannot run
    monkeypatch.setattr(attn_mod, "flash_unsupported", lambda *args: [])
    assert document_segments(ids_BL, "sdpa") is ids_BL
    assert document_segments(ids_BL, "eager") is ids_BL
    segments = document_segments(ids_BL, "auto")
    assert isinstance(segments, DocSegments) and segments.doc_ids_BL is ids_BL
    assert segments.cu_seqlens_S.tolist() == [0, 2, 5, 7, 10]
    assert document_segments(segments, "flash") is segments


def _bf16_model(attention_backend: str) -> Transformer:
    model = Transformer(tiny_config(attention=attention_backend, max_seq_len=24))
    model.init_weights(seed=5)
    return model.to(torch.bfloat16)


def test_model_computes_the_varlen_layout_once_per_forward(fake_flash) -> None:
    fake, computed = fake_flash
    model = _bf16_model("flash")
    tokens_BL = torch.randint(0, model.cfg.vocab_size, DOC_IDS_BL.shape)
    logits_BLV = model(tokens_BL, DOC_IDS_BL)
    # One computation for the forward, none in the layers: every layer got the same tensor,
    # and the row length as max_seqlen (no .item()).
    assert len(computed) == 1 and len(fake.varlen_calls) == model.cfg.n_layers
    first = fake.varlen_calls[0][0]
    assert all(cu is first and max_len == 24 for cu, max_len in fake.varlen_calls)
    assert first.tolist() == [0, 5, 17, 24, 44, 48]
    reference_BLV = _bf16_model("eager")(tokens_BL, DOC_IDS_BL)
    torch.testing.assert_close(logits_BLV, reference_BLV, rtol=0, atol=2e-2)


def test_attention_without_segments_still_computes_them(fake_flash) -> None:
    fake, computed = fake_flash
    q, k, v = (t.bfloat16() for t in random_qkv(G=2))
    out_BHLK = attention(q, k, v, "flash", DOC_IDS_BL)
    assert len(computed) == 1 and len(fake.varlen_calls) == 1
    reference = eager_attention(q, k, v, DOC_IDS_BL)
    torch.testing.assert_close(out_BHLK, reference, rtol=0, atol=1e-2)


def test_segments_pass_through_model_wrappers(fake_flash) -> None:
    """Activation checkpointing and FSDP's input handling see a NamedTuple of tensors."""
    from distrib.parallel.activation import apply_ac

    fake, computed = fake_flash
    model = _bf16_model("flash")
    apply_ac(model, "selective")
    tokens_BL = torch.randint(0, model.cfg.vocab_size, DOC_IDS_BL.shape)
    model(tokens_BL, DOC_IDS_BL).float().sum().backward()
    # Recomputation in backward reuses the forward's segments.
    assert len(computed) == 1 and len(fake.varlen_calls) == 2 * model.cfg.n_layers


def test_flash_block_with_segments_traces_without_graph_breaks(fake_flash) -> None:
    """With the layout precomputed a compiled block holds no host sync; computing it inside
    (nonzero, data-dependent) breaks the graph."""
    fake, _ = fake_flash
    # A traceable stand-in for the kernel (the fake above reads cu_seqlens on the host).
    fake.flash_attn_varlen_func = lambda q_THK, *args, **kwargs: q_THK * 2
    model = _bf16_model("flash")
    block, rope = model.layers["0"], (model.rope_cos, model.rope_sin)
    x_BLD = torch.randn(*DOC_IDS_BL.shape, model.cfg.dim, dtype=torch.bfloat16)

    def breaks(doc_ids: Tensor | DocSegments) -> int:
        torch._dynamo.reset()
        try:
            return torch._dynamo.explain(block)(x_BLD, *rope, doc_ids).graph_break_count
        finally:
            torch._dynamo.reset()

    assert breaks(document_segments(DOC_IDS_BL, "flash")) == 0
    assert breaks(DOC_IDS_BL) > 0


def test_cudnn_backend_pins_cudnn_first_on_cuda_and_is_refused_elsewhere() -> None:
    with pytest.raises(ValueError, match="'cudnn'.*CUDA device"):
        attn_mod.resolve_backend("cudnn", "cpu")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attn_mod.resolve_backend("cudnn", "cuda", torch.float32)
    assert attn_mod.resolve_backend("cudnn", "cuda", torch.bfloat16, 128) == "cudnn"
    plan = attn_mod._sdpa_plan("cuda", torch.bfloat16, 128, False, False, cudnn_first=True)
    assert plan.name == "sdpa" and plan.kernels[0] == SDPBackend.CUDNN_ATTENTION
    assert set(plan.kernels) == set(attn_mod.sdpa_kernels("cuda", torch.bfloat16, 128, False))
    line = attn_mod.describe_plan(plan, "cuda", torch.bfloat16, masked=False)
    assert "kernels CUDNN_ATTENTION" in line
