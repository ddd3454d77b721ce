"""The tiny model the parallelism tests share: small enough for several processes on two cores."""

from __future__ import annotations

from typing import Any

from distrib.config import ModelConfig


def tiny_config(**overrides: Any) -> ModelConfig:
    """dim 32, 2 layers, 4 query / 2 KV heads (GQA), untied, eager attention; any field overridable."""
    base: dict[str, Any] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 64,
        "vocab_size": 64,
        "max_seq_len": 32,
        "tie_embeddings": False,
        "attention": "eager",
    }
    return ModelConfig(**{**base, **overrides})
