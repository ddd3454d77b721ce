"""The Mixture-of-Experts layer against a per-token reference loop, and its balancing.

Tolerances: float32 throughout; the grouped dispatch and the reference sum the same products in
a different order, so outputs agree to atol 1e-6 + rtol 1e-6 (measured: relative below 3e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distrib.config import ModelConfig
from distrib.models.build import build_model
from distrib.models.moe import (
    GroupedExperts,
    MoE,
    load_balancing_loss,
    moe_layers,
    router_z_loss,
    set_aux_loss_scale,
)
from distrib.train.metrics import active_matmul_params, idle_expert_params
from tests.support.tiny import tiny_config

ATOL = RTOL = 1e-6


def _moe(**overrides: object) -> MoE:
    options = {"moe_experts": 6, "moe_top_k": 2, "moe_ffn_dim": 16, "family": "custom"}
    cfg = tiny_config(**{**options, **overrides})
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layer.reset_buffers()
    return layer


def _reference(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token: score every expert, keep the top-k (bias for the choice only), sum the
    chosen experts' SwiGLU outputs with their (normalized, scaled) weights."""
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    out = []
    for x_D in x_TD:
        logits_E = layer.router.weight @ x_D
        scores_E = logits_E.softmax(-1) if layer.score == "softmax" else logits_E.sigmoid()
        chosen = (scores_E + layer.expert_bias).topk(layer.top_k).indices
        weights = scores_E[chosen]
        if layer.norm_topk:
            weights = weights / weights.sum()
        y_D = torch.zeros_like(x_D)
        for e, w in zip(chosen.tolist(), weights * layer.route_scale, strict=True):
            y_D += w * (w2[e] @ (F.silu(w1[e] @ x_D) * (w3[e] @ x_D)))
        if layer.shared is not None:
            y_D += layer.shared(x_D)
        out.append(y_D)
    return torch.stack(out)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"moe_score": "sigmoid", "moe_route_scale": 2.5},
        {"moe_norm_topk": False},
        {"moe_shared_experts": 2, "moe_top_k": 3},
    ],
    ids=["softmax", "sigmoid_scaled", "unnormalized", "shared"],
)
def test_dispatch_and_combine_equal_a_per_token_loop(options: dict) -> None:
    layer = _moe(**options)
    x_BLD = torch.randn(3, 7, layer.router.weight.shape[1])
    got = layer(x_BLD)
    want = _reference(layer, x_BLD.reshape(-1, x_BLD.shape[-1])).reshape(x_BLD.shape)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_every_token_reaches_exactly_its_top_k_experts() -> None:
    layer = _moe()
    x_TD = torch.randn(40, layer.router.weight.shape[1])
    ids_TK = layer.route(x_TD).ids_TK
    order_N, counts_E = layer.dispatch_order(ids_TK)
    # Sorted by expert, each expert's rows in one block, each (token, slot) pair once.
    assert sorted(order_N.tolist()) == list(range(40 * layer.top_k))
    experts_in_order = ids_TK.flatten()[order_N]
    assert torch.equal(experts_in_order, torch.sort(ids_TK.flatten(), stable=True).values)
    assert counts_E.sum() == 40 * layer.top_k
    assert all(len(set(row)) == layer.top_k for row in ids_TK.tolist())  # k distinct experts
    # Experts that return their expert index tag every row: each token gets exactly its own.
    seen: list[torch.Tensor] = []

    def tag(module: GroupedExperts, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x_ND, counts = args
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
        seen.append(expert_of_row)
        return out

    layer.experts.register_forward_hook(tag)
    layer(x_TD[None])
    token_of_row = order_N // layer.top_k
    for t in range(40):
        assert sorted(seen[0][token_of_row == t].tolist()) == sorted(ids_TK[t].tolist())


def test_bias_changes_the_choice_not_the_weights() -> None:
    layer = _moe()
    x_TD = torch.randn(16, layer.router.weight.shape[1])
    before_ids = layer.route(x_TD).ids_TK
    layer.expert_bias[3] = 10.0  # expert 3 now always chosen
    ids, weights, logits, _ = layer.route(x_TD)
    assert (ids == 3).any(dim=1).all()
    scores = logits.softmax(-1).gather(-1, ids)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))
    assert not torch.equal(ids, before_ids)


def test_bias_balancing_moves_a_skewed_router_towards_uniform_load() -> None:
    layer = _moe(moe_score="sigmoid")
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 scores high for every token
    x_TD = torch.randn(256, layer.router.weight.shape[1]).abs()

    def imbalance() -> float:
        _, counts = layer.dispatch_order(layer.route(x_TD).ids_TK)
        return float(counts.max() / counts.float().mean())

    start = imbalance()
    for _ in range(300):
        _, counts = layer.dispatch_order(layer.route(x_TD).ids_TK)
        layer.update_bias(counts, rate=0.01)
    assert start > 2.0
    assert imbalance() < 1.3 < start


def test_auxiliary_losses_train_through_the_attached_gradient() -> None:
    """The attached load-balancing and z losses give the router the gradient of
    `loss + coef * aux + z_coef * z`, scaled like the loss the engine backpropagates."""
    coef, z_coef, scale = 0.3, 0.05, 0.25
    layer = _moe(moe_aux_loss_coef=coef, moe_z_loss_coef=z_coef)
    layer.train()
    x_BLD = torch.randn(2, 9, layer.router.weight.shape[1])
    set_aux_loss_scale([layer], scale)
    (layer(x_BLD).square().sum() * scale).backward()
    got = layer.router.weight.grad.clone()

    layer.zero_grad()
    layer.eval()  # no attachment: add the losses by hand
    out = layer(x_BLD)
    logits = layer.router(x_BLD.reshape(-1, x_BLD.shape[-1]))
    ids = layer.route(x_BLD.reshape(-1, x_BLD.shape[-1])).ids_TK
    # The Switch loss by its definition, from the logits: E * sum_e f_e * P_e.
    fraction = torch.bincount(ids.flatten(), minlength=6).float() / ids.numel()
    aux = 6 * (fraction * logits.softmax(-1).mean(0)).sum()
    total = out.square().sum() + coef * aux + z_coef * router_z_loss(logits)
    (total * scale).backward()
    torch.testing.assert_close(got, layer.router.weight.grad, atol=1e-6, rtol=1e-5)


def test_loss_values_and_statistics() -> None:
    logits = torch.zeros(8, 4)
    uniform = logits.softmax(-1)
    balanced = torch.tensor([4, 4, 4, 4])
    assert float(load_balancing_loss(uniform, balanced, "softmax")) == pytest.approx(1.0)
    skewed = torch.tensor([8, 8, 0, 0])  # all to experts 0 and 1, which take all probability
    peaked = torch.tensor([[30.0, 30.0, -30.0, -30.0]] * 8).softmax(-1)
    assert float(load_balancing_loss(peaked, skewed, "softmax")) == pytest.approx(2.0)
    sigmoid = torch.tensor([[0.9, 0.9, 0.0, 0.0]] * 8)  # normalized per token: 1/2, 1/2, 0, 0
    assert float(load_balancing_loss(sigmoid, skewed, "sigmoid")) == pytest.approx(2.0)
    assert float(router_z_loss(logits)) == pytest.approx(torch.log(torch.tensor(4.0)) ** 2)
    layer = _moe()
    layer.train()
    layer(torch.randn(2, 5, layer.router.weight.shape[1]))
    counts, means = layer.take_stats()
    assert counts.sum() == 2 * 5 * layer.top_k and means.shape == (2,)
    assert layer.take_stats()[0].sum() == 0  # taken: reset


def test_grouped_mm_path_equals_the_loop() -> None:
    """torch._grouped_mm's CPU forward (its backward does not run on CPU) against the loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    experts = GroupedExperts(4, 16, 8)
    for w in experts.parameters():
        torch.nn.init.normal_(w)
    x = torch.randn(11, 16)
    counts = torch.tensor([3, 0, 6, 2])
    with torch.no_grad():
        ws = (experts.w1, experts.w2, experts.w3)
        torch.testing.assert_close(
            GroupedExperts._grouped(x, counts, *ws), GroupedExperts._loop(x, counts, *ws)
        )


def test_grouped_mm_kernel_refused_where_it_cannot_run() -> None:
    experts = GroupedExperts(2, 8, 4, kernel="grouped_mm")
    with pytest.raises(ValueError, match="model.moe_kernel"):
        experts(torch.randn(3, 8), torch.tensor([1, 2]))


def test_model_layers_and_initialization() -> None:
    cfg = tiny_config(moe_experts=4, moe_dense_layers=1, moe_shared_experts=1, family="custom")
    model = build_model(cfg, torch.device("cpu"), seed=3)
    assert list(moe_layers(model)) == ["1", "2", "3"]
    layer = moe_layers(model)["1"]
    assert torch.equal(layer.expert_bias, torch.zeros(4))
    # Each expert is initialized like a dense SwiGLU; the down projections like other residual
    # writers (std / sqrt(2 n_layers)).
    assert float(layer.experts.w1.detach().std()) == pytest.approx(cfg.init_std, rel=0.1)
    assert float(layer.experts.w2.detach().std()) == pytest.approx(cfg.init_std / 8**0.5, rel=0.1)
    assert "layers.1.feed_forward.expert_bias" in model.state_dict()
    assert "layers.1.feed_forward.tokens_per_expert" not in model.state_dict()


def test_active_parameters_of_mixtral_8x7b() -> None:
    """Mixtral-8x7B: 46.7B parameters, 12.9B active (Mistral AI's figures)."""
    mixtral = ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        vocab_size=32000,
        tie_embeddings=False,
        moe_experts=8,
        moe_top_k=2,
    )
    experts = 32 * 8 * 3 * 4096 * 14336
    other = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 8 * 4096 + 2 * 4096) + 2 * 32000 * 4096
    total = experts + other + 4096
    assert total / 1e9 == pytest.approx(46.7, abs=0.05)
    assert (total - idle_expert_params(mixtral)) / 1e9 == pytest.approx(12.9, abs=0.05)
    # FLOPs count the active weights (the embedding lookup is not a matmul).
    assert active_matmul_params(mixtral) == total - idle_expert_params(mixtral) - 32000 * 4096 - (
        32 * 2 * 4096 + 4096
    )


def test_per_layer_metrics_become_scalars() -> None:
    from distrib.train.metrics import _per_layer_scalars

    record = {"moe_layers": [1, 3], "moe_imbalance": [1.5, 2.0], "moe_z_loss": [0.1, None]}
    assert _per_layer_scalars(record) == {
        "moe_imbalance/layer1": 1.5,
        "moe_imbalance/layer3": 2.0,
        "moe_z_loss/layer1": 0.1,
    }
    assert _per_layer_scalars({"loss": 1.0}) == {}


def test_float8_leaves_routers_alone() -> None:
    from distrib.parallel.float8 import float8_filter

    model = build_model(
        tiny_config(moe_experts=16, moe_shared_experts=1, moe_ffn_dim=32, family="custom"),
        torch.device("cpu"),
        seed=0,
    )
    chosen = {name for name, module in model.named_modules() if float8_filter(module, name)}
    assert "layers.0.feed_forward.shared.w1" in chosen  # a dense SwiGLU like any other
    assert not any(name.endswith("router") for name in chosen)
