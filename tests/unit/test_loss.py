"""Unit tests for distrib.models.loss: the chunked head + loss equals the plain one, in value and in
gradients, without ever holding the whole float32 logits; the compiled loss equals the eager one.

Shape legend: B batch, L sequence, D model dim, V vocab, T tokens (B * L).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import distrib.engines.objectives as objectives_mod
from distrib.data.loader import Batch
from distrib.models.loss import (
    causal_lm_loss,
    chunked_causal_lm_loss,
    compiled_causal_lm_loss,
)
from distrib.models.transformer import Transformer
from tests.support.tiny import tiny_config

B, L, D, V = 2, 24, 16, 97
T = B * L
TOL = {"rtol": 1e-5, "atol": 1e-6}
# Dividing (48 = 3 x 16), not dividing (48 = 6 x 7 + 6), one token, and larger than the tokens.
CHUNKS = [16, 7, 1, T, 1000]


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h_BLD = torch.randn(B, L, D, generator=g)
    weight_VD = torch.randn(V, D, generator=g) * 0.3
    labels_BL = torch.randint(0, V, (B, L), generator=g)
    return h_BLD, weight_VD, labels_BL


def loss_and_grads(chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and its gradients w.r.t. the hidden states and the output weight."""
    h_BLD, weight_VD, labels_BL = inputs()
    h_BLD.requires_grad_(True)
    weight_VD.requires_grad_(True)
    if chunk_tokens == 0:
        loss = causal_lm_loss(h_BLD @ weight_VD.T, labels_BL)
    else:
        loss = chunked_causal_lm_loss(h_BLD, weight_VD, labels_BL, chunk_tokens)
    loss.backward()
    return loss.detach(), h_BLD.grad, weight_VD.grad


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_chunked_equals_plain_with_equal_gradients(chunk_tokens: int) -> None:
    want_loss, want_dh, want_dw = loss_and_grads(0)
    got_loss, got_dh, got_dw = loss_and_grads(chunk_tokens)
    assert got_loss.dtype == torch.float32 and got_loss.shape == ()
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    torch.testing.assert_close(got_dh, want_dh, **TOL)
    torch.testing.assert_close(got_dw, want_dw, **TOL)


def test_ignored_labels_count_as_in_the_plain_loss() -> None:
    h_BLD, weight_VD, labels_BL = inputs()
    labels_BL[0, :5] = -100  # F.cross_entropy's default ignore_index
    want = torch.nn.functional.cross_entropy(
        (h_BLD @ weight_VD.T).flatten(0, 1), labels_BL.flatten()
    )
    torch.testing.assert_close(causal_lm_loss(h_BLD @ weight_VD.T, labels_BL), want, **TOL)
    torch.testing.assert_close(chunked_causal_lm_loss(h_BLD, weight_VD, labels_BL, 7), want, **TOL)


def test_chunked_in_bfloat16_upcasts_each_chunk() -> None:
    h_BLD, weight_VD, labels_BL = inputs()
    h_BLD, weight_VD = h_BLD.bfloat16(), weight_VD.bfloat16()
    want = causal_lm_loss(h_BLD @ weight_VD.T, labels_BL)
    got = chunked_causal_lm_loss(h_BLD, weight_VD, labels_BL, 7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunk_tokens_must_be_positive() -> None:
    h_BLD, weight_VD, labels_BL = inputs()
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(h_BLD, weight_VD, labels_BL, 0)


# --- memory -------------------------------------------------------------------------------------


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces while active, forward or backward."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def largest_float32(chunk_tokens: int) -> int:
    h_BLD, weight_VD, labels_BL = inputs()
    h_BLD, weight_VD = h_BLD.requires_grad_(True), weight_VD.requires_grad_(True)
    with LargestFloat32() as mode:
        if chunk_tokens == 0:
            loss = causal_lm_loss(h_BLD @ weight_VD.T, labels_BL)
        else:
            loss = chunked_causal_lm_loss(h_BLD, weight_VD, labels_BL, chunk_tokens)
        loss.backward()
    return mode.numel


def test_chunked_never_allocates_the_whole_logits() -> None:
    assert D < T  # so the weight and its gradient ([V, D]) are smaller than [T, V]
    assert largest_float32(0) == T * V  # the probe sees the plain loss's logits (and gradient)
    # With chunks of 7 tokens the largest is the output weight's gradient, made only in
    # backward, so the probe did watch the backward (and its recompute) too.
    assert 7 * V < V * D < T * V
    assert largest_float32(7) == V * D


# --- through the model --------------------------------------------------------------------------


def tiny_model(tie: bool) -> Transformer:
    cfg = tiny_config(vocab_size=V, attention="sdpa", tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    return model


def model_loss_and_grads(
    tie: bool, chunk_tokens: int | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """chunk_tokens None: logits out, loss outside; else the model's own labels path."""
    model = tiny_model(tie)
    g = torch.Generator().manual_seed(1)
    tokens_BL = torch.randint(0, V, (B, L), generator=g)
    labels_BL = torch.randint(0, V, (B, L), generator=g)
    if chunk_tokens is None:
        loss = causal_lm_loss(model(tokens_BL), labels_BL)
    else:
        loss = model(tokens_BL, labels_BL=labels_BL, loss_chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_tokens", [0, 16, 7, 1000])
def test_model_labels_path_equals_logits_then_loss(tie: bool, chunk_tokens: int) -> None:
    want_loss, want_grads = model_loss_and_grads(tie, None)
    got_loss, got_grads = model_loss_and_grads(tie, chunk_tokens)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got_grads.keys() == want_grads.keys()
    assert ("output.weight" in got_grads) == (not tie)  # a tied weight is listed once
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, **TOL, msg=name)


def test_model_without_labels_returns_logits() -> None:
    model = tiny_model(tie=False)
    tokens_BL = torch.randint(0, V, (B, L))
    logits_BLV = model(tokens_BL)
    assert logits_BLV.shape == (B, L, V)
    torch.testing.assert_close(model(tokens_BL, loss_chunk_tokens=7), logits_BLV, rtol=0, atol=0)


# --- compile ------------------------------------------------------------------------------------


def test_compiled_loss_equals_eager_and_is_built_once() -> None:
    assert compiled_causal_lm_loss() is compiled_causal_lm_loss()
    h_BLD, weight_VD, labels_BL = inputs()
    logits_BLV = (h_BLD @ weight_VD.T).requires_grad_(True)
    want = causal_lm_loss(logits_BLV, labels_BL)
    (want_grad,) = torch.autograd.grad(want, logits_BLV)
    got = compiled_causal_lm_loss()(logits_BLV, labels_BL)
    (got_grad,) = torch.autograd.grad(got, logits_BLV)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_forward_loss_takes_the_compiled_loss_or_the_model_s_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine's forward_loss: compiled loss when asked, the model's labels path when
    chunking; the same loss every way."""
    model = tiny_model(tie=True)
    g = torch.Generator().manual_seed(2)
    batch = Batch(
        torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)
    )
    cpu = torch.device("cpu")
    want = causal_lm_loss(model(batch.inputs), batch.labels)
    calls: list[int] = []

    def counting() -> object:
        calls.append(1)
        return compiled_causal_lm_loss()

    monkeypatch.setattr(objectives_mod, "compiled_causal_lm_loss", counting)
    got = {
        "plain": objectives_mod.forward_loss(model, batch, cpu),
        "compiled": objectives_mod.forward_loss(model, batch, cpu, compiled=True),
        "chunked": objectives_mod.forward_loss(model, batch, cpu, loss_chunk_tokens=7),
    }
    assert len(calls) == 1  # only the compiled call; chunking keeps the head eager
    for name, loss in got.items():
        torch.testing.assert_close(loss, want, **TOL, msg=name)
