"""Building the model: on the meta device first, so no process allocates more than its share.

`build_on_meta` is the one place a `Transformer` is constructed without memory; everything that
needs the model's shape (parameter counts, HF name maps, pipeline stages, the engines) starts
here. Parallel layouts materialize their shards with `distrib.parallel.init.materialize`, which
knows DTensors; `build_model` is the whole model in one process (generation, export, benchmarks).
"""

from __future__ import annotations

import torch

from distrib.config import ModelConfig
from distrib.models.transformer import Transformer


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The whole model with shapes but no storage."""
    with torch.device("meta"):
        return Transformer(cfg)


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """The whole model for one process, materialized on `device` and initialized from `seed`
    (each parameter's value depends only on the seed and its name, as in every layout)."""
    model = build_on_meta(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def build_empty(cfg: ModelConfig, device: torch.device) -> Transformer:
    """The whole model on `device` with uninitialized weights and valid buffers (RoPE tables, zero MoE bias), for
    weights that come from a checkpoint."""
    model = build_on_meta(cfg)
    model.to_empty(device=device)
    model.init_buffers()
    return model
