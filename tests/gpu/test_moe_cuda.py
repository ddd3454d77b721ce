"""The MoE expert kernels on CUDA: `torch._grouped_mm` (sm90+, bfloat16) against the per-expert
loop, forward and backward, and `moe_kernel = "auto"` choosing it there. On a CPU the loop is
tested in tests/unit/test_moe.py (torch's CPU grouped_mm has no backward)."""

from __future__ import annotations

import pytest
import torch

from distrib.models.moe import GroupedExperts, MoE, grouped_mm_available
from tests.support.tiny import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Both paths multiply bfloat16 inputs with float32 accumulation; what differs is the kernel's
# blocking (summation order).
REL_TOL = 2e-2


def _needs_grouped_mm() -> None:
    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_available(probe):
        pytest.skip("torch._grouped_mm needs compute capability 9.0+ here")


def test_auto_picks_grouped_mm_where_it_runs() -> None:
    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    major, _ = torch.cuda.get_device_capability()
    assert grouped_mm_available(probe) == (major >= 9 and hasattr(torch, "_grouped_mm"))
    assert not grouped_mm_available(probe.float())
    with torch.autocast("cuda", dtype=torch.bfloat16):  # float32 activations, bf16 matmuls
        assert grouped_mm_available(probe.float()) == grouped_mm_available(probe)


@pytest.mark.parametrize("counts", [[64, 0, 200, 36], [1, 7, 3, 293]])
def test_grouped_mm_equals_the_loop_forward_and_backward(counts: list[int]) -> None:
    _needs_grouped_mm()
    torch.manual_seed(0)
    experts = GroupedExperts(4, 256, 512).cuda().bfloat16()
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.05)
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16)
    counts_t = torch.tensor(counts, device="cuda")
    results = []
    for kernel in ("grouped_mm", "loop"):
        experts.kernel = kernel
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = experts(xi, counts_t)
        y.float().square().sum().backward()
        results.append((y.float(), xi.grad.float(), experts.w1.grad.float()))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=REL_TOL, atol=REL_TOL * want.abs().max().item())


def test_moe_layer_trains_with_grouped_mm_under_autocast() -> None:
    _needs_grouped_mm()
    cfg = tiny_config(dim=256, ffn_dim=512, moe_experts=8, moe_top_k=2, family="custom")
    torch.manual_seed(0)
    layer = MoE(cfg).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer.reset_buffers()
    x = torch.randn(4, 128, 256, device="cuda")
    outs = []
    for kernel in ("grouped_mm", "loop"):
        layer.experts.kernel = kernel
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        outs.append((y.float(), layer.router.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=REL_TOL, atol=REL_TOL)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=5e-2, atol=1e-3)
