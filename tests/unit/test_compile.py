"""Each transformer block compiles to one graph with no breaks: for every CPU attention backend,
with and without document masking, and wrapped in activation checkpointing. A graph break would
split the per-block compile (`apply_compile`) into pieces run eagerly in between."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from distrib.models.transformer import Transformer, TransformerBlock, rope_cache
from distrib.parallel.activation import apply_ac
from tests.support.tiny import tiny_config

B, L = 2, 16


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each case traces from scratch: no cached graphs or guards carried over between cases."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(dim: int, with_doc_ids: bool) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(0)
    x_BLD = torch.randn(B, L, dim, generator=gen, requires_grad=True)
    doc_ids_BL = (torch.rand(B, L, generator=gen) < 0.2).long().cumsum(dim=1)
    return x_BLD, doc_ids_BL if with_doc_ids else None


def _assert_one_graph(block: nn.Module, *args: Tensor | None) -> None:
    explained = torch._dynamo.explain(block)(*args)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["causal", "doc_ids"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_block_compiles_without_graph_breaks(attention: str, with_doc_ids: bool) -> None:
    cfg = tiny_config(attention=attention)
    torch.manual_seed(0)
    block = TransformerBlock(cfg)
    cos_PK, sin_PK = rope_cache(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    x_BLD, doc_ids_BL = _inputs(cfg.dim, with_doc_ids)
    # The call Transformer.forward makes: (h, full RoPE tables, doc ids).
    _assert_one_graph(block, x_BLD, cos_PK, sin_PK, doc_ids_BL)


@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["causal", "doc_ids"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_block_compiles_without_graph_breaks(mode: str, with_doc_ids: bool) -> None:
    cfg = tiny_config(attention="sdpa")
    model = Transformer(cfg)
    model.init_weights(seed=0)
    apply_ac(model, mode)
    x_BLD, doc_ids_BL = _inputs(cfg.dim, with_doc_ids)
    _assert_one_graph(model.layers["0"], x_BLD, model.rope_cos, model.rope_sin, doc_ids_BL)


@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["causal", "doc_ids"])
def test_block_with_pinned_sdpa_kernels_compiles_without_graph_breaks(
    with_doc_ids: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the sdpa backend runs under `sdpa_kernel(...)`; off CUDA nothing is pinned, so
    the case above never enters that context manager. Pin here to kernels the CPU has, so the
    context manager itself is traced: it must not split the block's graph either."""
    from torch.nn.attention import SDPBackend

    from distrib.models import attention as attn_mod

    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    monkeypatch.setattr(attn_mod, "sdpa_kernels", lambda *args: kernels)
    monkeypatch.setattr(attn_mod, "_PLANS", {})
    cfg = tiny_config(attention="sdpa")
    torch.manual_seed(0)
    block = TransformerBlock(cfg)
    cos_PK, sin_PK = rope_cache(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    x_BLD, doc_ids_BL = _inputs(cfg.dim, with_doc_ids)
    expected = block(x_BLD, cos_PK, sin_PK, doc_ids_BL)
    assert attn_mod._PLANS and all(p.kernels == tuple(kernels) for p in attn_mod._PLANS.values())
    _assert_one_graph(block, x_BLD, cos_PK, sin_PK, doc_ids_BL)
    compiled = torch.compile(block)(x_BLD, cos_PK, sin_PK, doc_ids_BL)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
