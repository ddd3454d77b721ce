"""Activation checkpointing and per-block compile: same numbers, same names, less saved."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from distrib.errors import ConfigError
from distrib.models.loss import causal_lm_loss
from distrib.models.transformer import Transformer
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.init import clean_name
from tests.support.tiny import tiny_config

CFG = tiny_config()


def _model(attention: str = "eager") -> Transformer:
    model = Transformer(dataclasses.replace(CFG, attention=attention))
    model.init_weights(seed=3)
    return model


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=gen)
    doc_ids = (torch.rand(2, 16, generator=gen) < 0.2).long().cumsum(dim=1)
    return tokens[:, :-1], tokens[:, 1:], doc_ids


def _loss_and_grads(model: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
    x, y, doc_ids = _batch()
    loss = causal_lm_loss(model(x, doc_ids), y)
    loss.backward()
    return loss.detach(), {clean_name(n): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_matches_no_ac(mode: str, attention: str) -> None:
    ref_loss, ref_grads = _loss_and_grads(_model(attention))
    model = _model(attention)
    apply_ac(model, mode)
    assert list(model.layers) == [str(i) for i in range(CFG.n_layers)]
    assert all(isinstance(block, CheckpointWrapper) for block in model.layers.values())
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=0, msg=name)


def test_none_leaves_the_model_alone() -> None:
    model = _model()
    blocks = list(model.layers.values())
    apply_ac(model, "none")
    assert list(model.layers.values()) == blocks
    with pytest.raises(ConfigError, match="selective"):
        apply_ac(model, "sometimes")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_names_and_state_dict_keys_survive_ac(mode: str) -> None:
    plain = _model()
    model = _model()
    apply_ac(model, mode)
    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    assert [clean_name(n) for n in names] == [n for n, _ in plain.named_parameters()]
    assert get_model_state_dict(model).keys() == get_model_state_dict(plain).keys()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode: str) -> Counter[str]:
    model = _model()
    apply_ac(model, mode)
    x, y, doc_ids = _batch()
    loss = causal_lm_loss(model(x, doc_ids), y)
    with _CountOps() as ops:
        loss.backward()
    return ops.counts


def test_selective_recomputes_elementwise_ops_but_no_matmul() -> None:
    none, full, selective = (_backward_ops(mode) for mode in ("none", "full", "selective"))
    # SiLU's forward runs again in backward only when the block is recomputed.
    assert none["silu"] == 0 and full["silu"] == selective["silu"] == CFG.n_layers
    # Full AC redoes the forward matmuls; selective AC keeps their outputs.
    assert full["mm"] > none["mm"] and selective["mm"] == none["mm"]
    assert full["bmm"] > none["bmm"] and selective["bmm"] == none["bmm"]


def _to_float8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Tensorwise float8 with its dequantizing scale, as torchao computes it: amax of abs."""
    scale = t.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
    return (t / scale).to(torch.float8_e4m3fn), scale


class _Float8Matmul(torch.autograd.Function):
    """x @ w.T through aten._scaled_mm: what torchao's Float8Linear is in a compiled graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        (x8, x_scale), (w8, w_scale) = _to_float8(x), _to_float8(w)
        return torch._scaled_mm(
            x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.float32
        )

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, w = ctx.saved_tensors
        return grad @ w, grad.t() @ x


def _float8_backward_ops(mode: str) -> Counter[str]:
    from torch.utils.checkpoint import checkpoint

    from distrib.parallel.activation import _selective_context

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=gen, requires_grad=True)
    w = torch.randn(16, 64, generator=gen, requires_grad=True)

    def block(x: Tensor, w: Tensor) -> Tensor:
        return torch.nn.functional.silu(_Float8Matmul.apply(x * 2, w))

    context = {"context_fn": _selective_context} if mode == "selective" else {}
    out = checkpoint(block, x, w, use_reentrant=False, **context)
    with _CountOps() as ops:
        out.sum().backward()
    return ops.counts


def test_selective_keeps_float8_matmuls_and_their_scales() -> None:
    from distrib.parallel.activation import _save_matmuls

    save = torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    for op in (torch.ops.aten._scaled_mm.default, torch.ops.aten.max.default):
        assert _save_matmuls(None, op) == save, op
    full, selective = _float8_backward_ops("full"), _float8_backward_ops("selective")
    # Full AC redoes the float8 matmul and its scale reductions; selective keeps them...
    assert full["_scaled_mm"] == 1 and full["max"] == 2
    assert selective["_scaled_mm"] == 0 and selective["max"] == 0
    # ... and still recomputes the elementwise ops around them (abs, the float8 casts).
    assert selective["abs"] == full["abs"] == 2
    assert selective["_to_copy"] == full["_to_copy"] == 2


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_compile_matches_eager(ac: str) -> None:
    # aot_eager: the same dynamo capture and autograd split as inductor, without the C++ build
    # (inductor takes ~30 s cold for one tiny block on this CPU).
    ref_loss, ref_grads = _loss_and_grads(_model("sdpa"))
    plain_keys = get_model_state_dict(_model("sdpa")).keys()
    model = _model("sdpa")
    apply_ac(model, ac)
    apply_compile(model, backend="aot_eager")
    assert list(model.layers) == [str(i) for i in range(CFG.n_layers)]
    assert not any("_orig_mod" in n for n, _ in model.named_parameters())
    assert get_model_state_dict(model).keys() == plain_keys
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def _saved_bytes_and_grads(memory_budget: float) -> tuple[int, Tensor, dict[str, Tensor]]:
    """Bytes the compiled blocks save for backward under `memory_budget`, with loss and grads.
    aot_eager_decomp_partition: the min-cut partitioner that reads the budget, without
    Inductor's C++ build."""
    torch._dynamo.reset()  # each budget partitions afresh
    model = _model("sdpa")
    apply_ac(model, "memory_budget", memory_budget)
    apply_compile(model, backend="aot_eager_decomp_partition")
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x, y, doc_ids = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model(x, doc_ids), y)
    loss.backward()
    return sum(saved), loss.detach(), {clean_name(n): p.grad for n, p in model.named_parameters()}


def test_memory_budget_saves_less_as_the_budget_falls_with_the_same_gradients() -> None:
    ref_loss, ref_grads = _loss_and_grads(_model("sdpa"))
    try:
        results = {b: _saved_bytes_and_grads(b) for b in (1.0, 0.5, 0.0)}
    finally:
        apply_ac(_model(), "none")  # back to torch's default budget for the tests after this
        torch._dynamo.reset()
    saved = {b: r[0] for b, r in results.items()}
    assert saved[1.0] > saved[0.5] > saved[0.0], saved
    for _, loss, grads in results.values():
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_memory_budget_wraps_nothing_and_other_modes_reset_the_budget() -> None:
    from torch._functorch import config as functorch_config

    model = _model()
    blocks = list(model.layers.values())
    try:
        apply_ac(model, "memory_budget", 0.25)
        assert list(model.layers.values()) == blocks
        assert functorch_config.activation_memory_budget == 0.25
        apply_ac(_model(), "selective")
        assert functorch_config.activation_memory_budget == 1.0
        with pytest.raises(ConfigError, match=r"in \[0, 1\].*got 2.0"):
            apply_ac(_model(), "memory_budget", 2.0)
    finally:
        apply_ac(_model(), "none")
