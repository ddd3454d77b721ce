"""Rotary position embeddings (RoPE) in Hugging Face's rotate_half layout, with Llama 3.1 scaling.

The tables are derived from the config, never stored: `model_rope_cache` computes them for a
`ModelConfig` (head dim, base, optional llama3 frequency scaling), `apply_rope` rotates queries
or keys by them. Same arithmetic as transformers (float32 inverse frequencies from an integer
arange, an outer product with the positions), so the tables agree bit for bit.

Shape legend: P max positions (max_seq_len), K head dim, J = K / 2 frequencies, L sequence,
B batch, H heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distrib.config import ModelConfig
from distrib.config.families import resolved_head_dim


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (Hugging Face rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


def llama3_scaling(cfg: ModelConfig) -> Llama3Scaling | None:
    """The model's llama3 scaling parameters, or None when `model.rope_scaling = 'none'`."""
    if cfg.rope_scaling != "llama3":
        return None
    return Llama3Scaling(
        cfg.rope_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_seq_len,
    )


def scale_llama3(inv_freq_J: Tensor, s: Llama3Scaling) -> Tensor:
    """Llama 3.1's scaled frequencies: wavelengths longer than original / low_freq_factor are
    stretched by `factor`, shorter than original / high_freq_factor kept, and those between
    interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen_J = 2 * math.pi / inv_freq_J
    scaled_J = torch.where(wavelen_J > low_freq_wavelen, inv_freq_J / s.factor, inv_freq_J)
    smooth_J = (s.original_max_seq_len / wavelen_J - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed_J = (1 - smooth_J) * scaled_J / s.factor + smooth_J * scaled_J
    medium_J = (wavelen_J >= high_freq_wavelen) & (wavelen_J <= low_freq_wavelen)
    return torch.where(medium_J, smoothed_J, scaled_J)


def rope_cache(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | str | None = None,
    scaling: Llama3Scaling | None = None,
) -> tuple[Tensor, Tensor]:
    """RoPE tables `(cos_PK, sin_PK)` in float32, in the rotate_half layout.

    Frequency j rotates the pair (j, j + K/2), so both halves of the head dim share one table
    half; this is Hugging Face's layout, which lets its q/k weights load without permutation.
    """
    exponents_J = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq_J = 1.0 / (theta ** (exponents_J / head_dim))
    if scaling is not None:
        inv_freq_J = scale_llama3(inv_freq_J, scaling)
    pos_P = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles_PJ = pos_P[:, None] * inv_freq_J[None, :]
    angles_PK = torch.cat([angles_PJ, angles_PJ], dim=-1)
    return angles_PK.cos(), angles_PK.sin()


def model_rope_cache(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """`rope_cache` for a model config: its head dim, base, length and scaling."""
    return rope_cache(
        resolved_head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, device, llama3_scaling(cfg)
    )


def _rotate_half(x_BHLK: Tensor) -> Tensor:
    x1, x2 = x_BHLK.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLK: Tensor, cos_LK: Tensor, sin_LK: Tensor) -> Tensor:
    """Rotate queries or keys by their absolute positions (tables already sliced to L)."""
    cos_LK, sin_LK = cos_LK.to(x_BHLK.dtype), sin_LK.to(x_BHLK.dtype)
    return x_BHLK * cos_LK + _rotate_half(x_BHLK) * sin_LK
