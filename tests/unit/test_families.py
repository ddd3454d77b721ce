"""Model families as configuration: the family table's checks, the attention options each family
turns on (q/k/v biases, qk-norm, head dim, sliding window) and llama3 RoPE scaling, on CPU.

The Hugging Face logits of each family are in test_hf_families.py.

Shape legend: B batch, L sequence, H heads, G kv heads, K head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from distrib.config import ConfigError, ModelConfig, load_config
from distrib.config.families import (
    FAMILIES,
    check_family,
    check_model_options,
    family_problem,
    resolved_head_dim,
    supported_architectures,
)
from distrib.models.attention import attention
from distrib.models.masks import causal_doc_mask, flash_window_size
from distrib.models.rope import Llama3Scaling, model_rope_cache, rope_cache
from distrib.models.transformer import Transformer
from tests.support.tiny import tiny_config

transformers = pytest.importorskip("transformers")

V = 512


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model


# --- the family table ------------------------------------------------------------------------------


def test_every_family_but_custom_names_an_hf_class() -> None:
    assert supported_architectures() == [
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    ]
    assert set(FAMILIES) == {"llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "custom"}


@pytest.mark.parametrize(
    "family, change",
    [
        ("llama", {}),
        ("llama", {"head_dim": 16, "rope_scaling": "llama3"}),
        ("qwen2", {"qkv_bias": True, "sliding_window": 8}),
        ("qwen3", {"qk_norm": True, "head_dim": 16, "sliding_window": 8}),
        ("mistral", {"sliding_window": 8, "head_dim": 16}),
        ("mixtral", {"moe_experts": 4, "sliding_window": 8}),
        ("qwen3_moe", {"moe_experts": 4, "qk_norm": True, "moe_dense_layers": 1}),
        ("qwen3_moe", {"moe_experts": 4, "qk_norm": True, "moe_ffn_dim": 16}),
        ("qwen3_moe", {"moe_experts": 4, "qk_norm": True, "moe_norm_topk": False}),
        ("custom", {"qkv_bias": True, "qk_norm": True, "moe_experts": 4, "moe_score": "sigmoid"}),
    ],
)
def test_family_accepts_its_options(family: str, change: dict) -> None:
    check_family(tiny_config(family=family, **change))


@pytest.mark.parametrize(
    "family, change, message",
    [
        (
            "llama",
            {"qk_norm": True},
            re.escape(
                "model.qk_norm = true is not part of family 'llama' "
                "(families with it: qwen3, qwen3_moe, custom)"
            ),
        ),
        ("llama", {"sliding_window": 4}, "model.sliding_window = 4 .* 'llama'"),
        ("qwen2", {}, "model.qkv_bias = false is not part of family 'qwen2', whose models always"),
        ("qwen2", {"qkv_bias": True, "head_dim": 16}, r"model.head_dim = 16 \(dim / n_heads = 8\)"),
        ("qwen3", {}, "model.qk_norm = false"),
        ("qwen3", {"qk_norm": True, "qkv_bias": True}, "families with it: qwen2, custom"),
        ("mistral", {"moe_experts": 4}, "model.moe_experts = 4 is not part of family 'mistral'"),
        ("mistral", {"rope_scaling": "llama3"}, "families with it: llama, custom"),
        ("mixtral", {}, "model.moe_experts = 0"),
        ("mixtral", {"moe_experts": 4, "moe_shared_experts": 1}, "model.moe_shared_experts = 1"),
        ("mixtral", {"moe_experts": 4, "moe_score": "sigmoid"}, "model.moe_score = 'sigmoid'"),
        ("mixtral", {"moe_experts": 4, "moe_norm_topk": False}, "moe_norm_topk = false"),
        ("mixtral", {"moe_experts": 4, "moe_dense_layers": 1}, "families with it: qwen3_moe"),
        ("mixtral", {"moe_experts": 4, "moe_ffn_dim": 16}, r"moe_ffn_dim = 16 \(ffn_dim = 64\)"),
        ("mixtral", {"moe_experts": 4, "moe_route_scale": 2.0}, "moe_route_scale = 2.0"),
        (
            "qwen3_moe",
            {"moe_experts": 4, "qk_norm": True, "moe_bias_update_rate": 0.001},
            r"model.moe_bias_update_rate = 0.001 .* \(families with it: custom\)",
        ),
        ("qwen3_moe", {"moe_experts": 4, "qk_norm": True, "sliding_window": 8}, "sliding_window"),
    ],
)
def test_family_refuses_what_it_cannot_express(family: str, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_family(tiny_config(family=family, **change))


def test_moe_keys_are_ignored_without_experts() -> None:
    """A dense model's MoE keys do nothing, so no family refuses them."""
    assert family_problem(tiny_config(moe_score="sigmoid"), FAMILIES["llama"]) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dim": 7}, "positive and even"),
        ({"head_dim": -2}, "positive and even"),
        ({"dim": 36, "n_heads": 8}, "set model.head_dim explicitly"),
        ({"sliding_window": -1}, "sliding_window must be >= 0"),
        ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "rope_low_freq_factor"),
    ],
)
def test_model_option_ranges(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_model_options(tiny_config(**change))


def test_head_dim_default_and_explicit() -> None:
    assert resolved_head_dim(tiny_config()) == 8
    assert resolved_head_dim(tiny_config(head_dim=16)) == 16


# --- attention options ---------------------------------------------------------------------------


def test_attention_parameters_follow_the_options() -> None:
    cfg = tiny_config(family="custom", qkv_bias=True, qk_norm=True, head_dim=16, n_layers=1)
    attn = build(cfg).layers["0"].attention
    H, G, K, D = cfg.n_heads, cfg.n_kv_heads, 16, cfg.dim
    assert attn.wq.weight.shape == (H * K, D) and attn.wq.bias.shape == (H * K,)
    assert attn.wk.bias.shape == (G * K,) and attn.wv.bias.shape == (G * K,)
    assert attn.wo.weight.shape == (D, H * K) and attn.wo.bias is None
    assert attn.q_norm.weight.shape == (K,) and attn.k_norm.weight.shape == (K,)
    # Initial values: biases zero, head norms one (the identity), like every other norm.
    assert torch.equal(attn.wq.bias, torch.zeros(H * K))
    assert torch.equal(attn.k_norm.weight, torch.ones(K))
    plain = build(tiny_config(n_layers=1)).layers["0"].attention
    assert plain.wq.bias is None and plain.q_norm is None and plain.k_norm is None


def test_sliding_window_mask_boundary() -> None:
    """Position i sees j with i - window < j <= i: the last `window` positions, itself included
    (Hugging Face Mistral's `kv_idx > q_idx - sliding_window`)."""
    allowed = causal_doc_mask(6, None, torch.device("cpu"), window=3)
    assert allowed[5].tolist() == [False, False, False, True, True, True]
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    whole = causal_doc_mask(6, None, torch.device("cpu"), window=6)
    assert torch.equal(whole, torch.ones(6, 6, dtype=torch.bool).tril())
    assert flash_window_size(3) == (2, 0) and flash_window_size(0) == (-1, -1)


@pytest.mark.parametrize("with_docs", [False, True], ids=["window", "window+docs"])
def test_sdpa_matches_eager_with_a_window(with_docs: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    B, H, G, L, K = 2, 4, 2, 12, 8
    q = torch.randn(B, H, L, K, generator=gen)
    k, v = torch.randn(B, G, L, K, generator=gen), torch.randn(B, G, L, K, generator=gen)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if with_docs else None
    eager = attention(q, k, v, "eager", doc_ids, window=4)
    sdpa = attention(q, k, v, "sdpa", doc_ids, window=4)
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-6)
    # The window matters here: without it the output differs.
    assert not torch.allclose(attention(q, k, v, "eager", doc_ids), eager, atol=1e-3)
    # Reference: a plain softmax over exactly the allowed keys, per query.
    i = 9
    lo = max(i - 4 + 1, 5 if with_docs else 0)
    scores = q[0, 0, i] @ k[0, 0, lo : i + 1].T / K**0.5
    expected = scores.softmax(-1) @ v[0, 0, lo : i + 1]
    torch.testing.assert_close(eager[0, 0, i], expected, rtol=0, atol=1e-6)


def test_qk_norm_acts_per_head_before_rope() -> None:
    """Scaling one query head's projection rows leaves the output unchanged: RMSNorm over the
    head dim removes it, and only before RoPE (rotation keeps the norm, so after would too, but
    a per-channel scale would not commute with the rotation)."""
    cfg = tiny_config(family="qwen3", qk_norm=True, n_layers=1, attention="eager")
    model = build(cfg, seed=1)
    tokens = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(tokens)
        model.layers["0"].attention.wq.weight[:8] *= 3.0  # head 0
        torch.testing.assert_close(model(tokens), before, rtol=0, atol=1e-4)  # eps aside
        model.layers["0"].attention.q_norm.weight.uniform_(0.5, 1.5)
        assert not torch.allclose(model(tokens), before, atol=1e-4)


@pytest.mark.parametrize("attention_backend", ["sdpa", "eager"])
def test_block_with_every_option_compiles_to_one_graph(attention_backend: str) -> None:
    """Biases, qk-norm, a head dim of its own and a window keep a block one compiled graph."""
    from distrib.models.transformer import TransformerBlock

    torch._dynamo.reset()
    change = {"qkv_bias": True, "qk_norm": True, "head_dim": 16, "sliding_window": 5}
    cfg = tiny_config(family="custom", attention=attention_backend, **change)
    block = TransformerBlock(cfg)
    cos, sin = model_rope_cache(cfg)
    x = torch.randn(2, 16, cfg.dim, requires_grad=True)
    explained = torch._dynamo.explain(block)(x, cos, sin, None)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


# --- RoPE --------------------------------------------------------------------------------------


def test_llama3_rope_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8192, **scaling},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_factor == 1.0
    s = Llama3Scaling(8.0, 1.0, 4.0, 8192)
    cos, sin = rope_cache(128, 40, 500000.0, scaling=s)
    angles = torch.arange(40.0)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos(), rtol=0, atol=0)
    torch.testing.assert_close(sin, torch.cat([angles, angles], -1).sin(), rtol=0, atol=0)
    # All three regimes occur: kept, interpolated, divided by the factor.
    plain_cos, plain_sin = rope_cache(128, 40, 500000.0)
    assert torch.equal(cos[:, 0], plain_cos[:, 0]) and not torch.equal(sin[:, 63], plain_sin[:, 63])


def test_model_rope_cache_uses_head_dim_and_scaling() -> None:
    cfg = tiny_config(head_dim=16, rope_scaling="llama3", rope_original_max_seq_len=32)
    cos, _ = model_rope_cache(cfg)
    assert cos.shape == (cfg.max_seq_len, 16)
    model = build(cfg)
    assert torch.equal(model.rope_cos, cos)
    assert not torch.equal(cos, model_rope_cache(dataclasses.replace(cfg, rope_scaling="none"))[0])


# --- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug_qwen2", "debug_qwen3", "debug_mistral"])
def test_debug_family_configs_build_and_run(name: str) -> None:
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.toml").model
    check_family(cfg)
    cfg = dataclasses.replace(cfg, n_layers=1, attention="sdpa")
    logits = build(cfg)(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all()
