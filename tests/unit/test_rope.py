"""RoPE scaling against transformers: for each `model.rope_scaling` scheme (none, linear, llama3,
yarn) the cos/sin tables of `model_rope_cache` equal those of transformers'
`LlamaRotaryEmbedding` for the matching `rope_parameters`, attention factor included; and the
config errors of each scheme name its keys.

Shape legend: P positions, K head dim.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from distrib.config import ConfigError, load_config
from distrib.config.families import check_model_options
from distrib.models.rope import YarnScaling, attention_factor, model_rope_cache, rope_frequencies
from tests.support.tiny import tiny_config

transformers = pytest.importorskip("transformers")

P = 4096  # long enough that every frequency turns, and float32 angles are large
THETA = 10000.0

# scheme -> (our model keys, transformers' rope_parameters besides rope_type and rope_theta).
# head dim 64, 1024 original positions: llama3 and yarn both have kept, blended and divided
# frequencies; the second yarn case moves its band and gives its own attention factor.
SCHEMES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({}, {}),
    "linear": ({"rope_factor": 4.0}, {"factor": 4.0}),
    "llama3": (
        {"rope_factor": 8.0, "rope_original_max_seq_len": 1024},
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ),
    "yarn": (
        {"rope_factor": 4.0, "rope_original_max_seq_len": 1024},
        {"factor": 4.0, "original_max_position_embeddings": 1024},
    ),
    "yarn-explicit": (
        {
            "rope_factor": 4.0,
            "rope_original_max_seq_len": 1024,
            "rope_beta_fast": 16.0,
            "rope_beta_slow": 2.0,
            "rope_attention_factor": 1.3,
        },
        {
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.3,
        },
    ),
}


def hf_tables(scheme: str, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """transformers' (cos_PK, sin_PK, attention factor) for a head dim of 64."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = "default" if scheme == "none" else scheme.split("-")[0]
    config = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=P,
        rope_parameters={"rope_type": rope_type, "rope_theta": THETA, **params},
    )
    embedding = LlamaRotaryEmbedding(config)
    cos, sin = embedding(torch.zeros(1), torch.arange(P)[None])
    return cos[0], sin[0], embedding.attention_scaling


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_tables_match_transformers(scheme: str) -> None:
    ours, params = SCHEMES[scheme]
    cfg = tiny_config(
        dim=256,
        n_heads=4,
        max_seq_len=P,
        rope_theta=THETA,
        rope_scaling=scheme.split("-")[0],
        **ours,
    )
    cos_PK, sin_PK = model_rope_cache(cfg)
    hf_cos_PK, hf_sin_PK, hf_factor = hf_tables(scheme, params)
    assert cos_PK.shape == hf_cos_PK.shape == (P, 64)
    torch.testing.assert_close(cos_PK, hf_cos_PK, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_PK, hf_sin_PK, rtol=0, atol=1e-6)
    if scheme != "none":  # the scaling changed the tables
        plain_cos_PK, _ = model_rope_cache(tiny_config(dim=256, n_heads=4, max_seq_len=P))
        assert not torch.allclose(cos_PK, plain_cos_PK, atol=1e-3)
    expected_factor = {"yarn": 0.1 * math.log(4.0) + 1, "yarn-explicit": 1.3}.get(scheme, 1.0)
    assert hf_factor == pytest.approx(expected_factor)
    assert cos_PK[0, 0].item() == pytest.approx(expected_factor)  # position 0: cos 0 = 1


def test_yarn_blends_between_its_bands() -> None:
    """Head dim 64, base 10^4, 1024 original positions: the band runs from frequency 5 (floor
    of where a frequency turns 32 times) to 18 (ceil of where it turns once); those up to 5 are
    kept, from 18 on divided by the factor, those between blended linearly."""
    s = YarnScaling(factor=4.0, original_max_seq_len=1024)
    plain_J, _ = rope_frequencies(64, THETA)
    inv_freq_J, factor = rope_frequencies(64, THETA, scaling=s)
    ratio_J = inv_freq_J / plain_J
    assert torch.allclose(ratio_J[:6], torch.ones(6))
    assert torch.allclose(ratio_J[18:], torch.full((14,), 0.25))
    kept_J = 1 - (torch.arange(6, 18) - 5) / 13
    assert torch.allclose(ratio_J[6:18], kept_J + (1 - kept_J) / 4)
    assert factor == attention_factor(s) == 0.1 * math.log(4.0) + 1
    assert attention_factor(YarnScaling(factor=0.5, original_max_seq_len=1024)) == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": "linear", "rope_factor": 0.0}, r"'linear' needs model.rope_factor > 0"),
        ({"rope_scaling": "linear", "rope_factor": float("nan")}, "rope_factor > 0.*got nan"),
        ({"rope_scaling": "yarn", "rope_factor": -2.0}, r"rope_factor = -2.0"),
        (
            {"rope_scaling": "yarn", "rope_beta_fast": 1.0, "rope_beta_slow": 1.0},
            r"rope_beta_fast > model.rope_beta_slow > 0.*rope_beta_fast = 1.0",
        ),
        ({"rope_scaling": "yarn", "rope_beta_slow": 0.0}, r"rope_beta_slow = 0.0"),
        ({"rope_scaling": "yarn", "rope_original_max_seq_len": 0}, "rope_original_max_seq_len = 0"),
        ({"rope_scaling": "yarn", "rope_attention_factor": -1.0}, "rope_attention_factor = -1.0"),
    ],
)
def test_config_errors_name_the_keys(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_options(tiny_config(**change))


def test_scheme_keys_only_checked_for_their_scheme() -> None:
    """llama3's and yarn's own keys are free while another scheme is on."""
    check_model_options(tiny_config(rope_scaling="linear", rope_beta_slow=0.0))
    check_model_options(tiny_config(rope_scaling="yarn", rope_low_freq_factor=9.0))
    check_model_options(tiny_config(rope_scaling="none", rope_factor=0.0))


def test_command_line_refuses_bad_yarn() -> None:
    with pytest.raises(ConfigError, match="model.rope_scaling = 'yarn' needs"):
        load_config(None, ["--model.rope_scaling=yarn", "--model.rope_beta_fast=0.5"])
    with pytest.raises(ConfigError, match="rope_scaling"):
        load_config(None, ["--model.rope_scaling=ntk"])
