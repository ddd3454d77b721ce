"""Float8 training on a float8-capable GPU: the block linears become Float8Linear, the head does
not, and a few training steps in float8 track the same steps in bfloat16."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distrib.models.transformer import Transformer
from distrib.parallel.float8 import apply_float8
from tests.support.tiny import tiny_config


def _float8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _float8_capable(), reason="needs a CUDA GPU of capability 8.9+"),
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao"),
]

# dim 256, head dim 64, 2 kv heads: every block linear has dims divisible by 16.
CFG = tiny_config(
    dim=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=512,
    vocab_size=512,
    max_seq_len=128,
    attention="sdpa",
)
STEPS = 5
REL_TOL = 0.05


def _model(float8: bool) -> Transformer:
    device = torch.device("cuda")
    with torch.device("meta"):
        model = Transformer(CFG)
    if float8:
        apply_float8(model, device)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    return model.to(torch.bfloat16)


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(
        0, CFG.vocab_size, (4, CFG.max_seq_len + 1), device="cuda", generator=gen
    )
    return tokens[:, :-1], tokens[:, 1:]


def _losses(model: nn.Module) -> list[float]:
    """Losses of STEPS AdamW steps on one fixed batch (memorizing it: the loss falls well below
    ln V, so the comparison measures more than the near-uniform logits of the initial model)."""
    x, y = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and param.grad.isfinite().all(), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_float8_linears_and_loss_track_bfloat16() -> None:
    from torchao.float8.float8_linear import Float8Linear

    model = _model(float8=True)
    for i in range(CFG.n_layers):
        block = model.layers[str(i)]
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                assert isinstance(module, Float8Linear), f"layers.{i}.{name}"
    assert type(model.output) is nn.Linear
    float8_losses = _losses(model)
    bf16_losses = _losses(_model(float8=False))
    assert all(torch.tensor(float8_losses).isfinite())
    assert bf16_losses[-1] < 0.9 * bf16_losses[0], bf16_losses  # the steps did learn something
    for step, (got, ref) in enumerate(zip(float8_losses, bf16_losses, strict=True)):
        assert abs(got - ref) <= REL_TOL * ref, f"step {step}: float8 {got} vs bf16 {ref}"
