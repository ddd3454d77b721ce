"""The one tiny model of the test suite, as a `ModelConfig` (in-process tests) and as `--model.*`
flags (tests that run the command line), both from the shape below.

Why each field is what it is:
- vocab_size 512: the test corpus (tests/conftest.py) is tokenized into that many tokens;
- max_seq_len 64: the command-line tests train on sequences of 64;
- 4 layers: pipelines of 2 stages of 2 layers, or 4 stages (2 per rank) of 1;
- 4 query / 2 KV heads (grouped-query attention): both divisible by tp = 2;
- untied embeddings: tensor and pipeline parallelism may split the input and output tables;
- dim 32, ffn 64: small, yet head dim 8 suits flash attention and every block linear has sides
  divisible by 16 (k/v: 2 heads x 8), as float8 needs.

A test that needs another size (fewer layers for speed, tied embeddings, a vocabulary of its own)
overrides those fields only: `tiny_config(n_layers=2)`, `tiny_flags(tie_embeddings=True)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from distrib.config import ModelConfig

TINY: dict[str, Any] = {
    "dim": 32,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_dim": 64,
    "vocab_size": 512,
    "max_seq_len": 64,
    "tie_embeddings": False,
}

_FIELDS = {field.name for field in dataclasses.fields(ModelConfig)}


def _fields(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(f"ModelConfig has no field(s) {unknown}")
    return {**TINY, **overrides}


def tiny_config(**overrides: Any) -> ModelConfig:
    """The tiny model's ModelConfig; any ModelConfig field may be overridden."""
    return ModelConfig(**_fields(overrides))


def tiny_flags(**overrides: Any) -> list[str]:
    """The tiny model as `distrib train` flags (`--model.KEY=VALUE`), overrides applied."""
    return [f"--model.{key}={_flag(value)}" for key, value in _fields(overrides).items()]


def _flag(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
