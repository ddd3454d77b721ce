"""Mixture-of-Experts and expert-parallel keys: bad values refused before any process starts,
the shipped MoE configs' sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib.config import load_config
from distrib.errors import ConfigError
from distrib.models.build import build_on_meta
from distrib.models.transformer import num_params
from distrib.parallel.dims import ParallelDims
from distrib.train.metrics import idle_expert_params

CONFIGS = Path(__file__).parents[2] / "configs"
MOE = ["--model.family=custom", "--model.moe_experts=8", "--training.global_batch_size=16"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--model.moe_top_k=9"], r"model.moe_top_k must be between 1 and model.moe_experts \(8\)"),
        (["--model.moe_top_k=0"], "model.moe_top_k must be between 1"),
        (["--model.moe_dense_layers=4"], r"moe_dense_layers must be in \[0, model.n_layers = 4\)"),
        (["--model.moe_aux_loss_coef=-1"], "model.moe_aux_loss_coef must be >= 0"),
        (["--model.moe_route_scale=0"], "model.moe_route_scale must be > 0"),
        (["--model.moe_ffn_dim=-2"], "model.moe_ffn_dim must be >= 0"),
        (["--parallel.ep=3", "--parallel.dp_shard=3"], r"parallel.ep \(3\) must divide model."),
        (
            ["--parallel.ep=4", "--parallel.dp_shard=2"],
            r"parallel.ep \(4\) must divide parallel.dp_shard \(2\).*valid ep: \[1, 2\]",
        ),
        (["--parallel.ep=0"], "parallel.ep must be >= 1"),
        (
            ["--parallel.ep=2", "--parallel.engine=deepspeed"],
            "parallel.ep > 1 needs parallel.engine = 'native'",
        ),
        (["--model.moe_kernel=grouped"], "did you mean 'grouped_mm'"),
        (["--model.moe_score=relu"], "model.moe_score"),
    ],
)
def test_bad_moe_keys_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*MOE, *overrides])


def test_ep_needs_experts() -> None:
    with pytest.raises(ConfigError, match="parallel.ep = 2 needs a Mixture-of-Experts model"):
        load_config(None, ["--parallel.ep=2", "--parallel.dp_shard=2"])


def test_ep_against_the_world_size() -> None:
    """With dp_shard inferred (-1), ep is checked once the world size is known, before any
    process group: 6 ranks give dp_shard = 6, which ep = 4 does not divide."""
    cfg = load_config(None, [*MOE, "--parallel.ep=4", "--parallel.dp_shard=-1"])
    with pytest.raises(ConfigError, match=r"parallel.ep \(4\) must divide parallel.dp_shard \(6\)"):
        ParallelDims.from_config(cfg.parallel, 6)
    assert ParallelDims.from_config(cfg.parallel, 8).ep == 4


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("mixtral_8x7b", 46.70, 12.88),
        ("qwen3_30b_a3b", 30.53, 3.35),
        ("debug_moe", None, None),
        ("debug_mixtral", None, None),
        ("debug_qwen3_moe", None, None),
    ],
)
def test_shipped_moe_configs(name: str, total: float | None, active: float | None) -> None:
    """Published sizes: Mixtral-8x7B 46.7B (12.9B active), Qwen3-30B-A3B 30.5B (3.3B)."""
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.model.moe_experts > 0
    n = num_params(build_on_meta(cfg.model))
    idle = idle_expert_params(cfg.model)
    if total is not None:
        assert n / 1e9 == pytest.approx(total, abs=0.02)
        assert (n - idle) / 1e9 == pytest.approx(active, abs=0.02)
    assert cfg.parallel.ep == 1 or cfg.model.moe_experts % cfg.parallel.ep == 0
