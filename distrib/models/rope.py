"""Rotary position embeddings (RoPE) in Hugging Face's rotate_half layout, with the context
extension schemes of `model.rope_scaling`: linear (position interpolation), llama3 (Llama 3.1)
and yarn (YaRN).

The tables are derived from the config, never stored: `model_rope_cache` computes them for a
`ModelConfig` (head dim, base, scaling), `apply_rope` rotates queries or keys by them. Same
arithmetic as transformers (`ROPE_INIT_FUNCTIONS`: float32 inverse frequencies from an integer
arange, an outer product with the positions, cos and sin times the attention factor), so the
tables agree bit for bit.

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
class LinearScaling:
    """Position interpolation (Hugging Face rope_type "linear"): every frequency divided by
    `factor`, which is positions divided by it."""

    factor: float


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (Hugging Face rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


@dataclass(frozen=True)
class YarnScaling:
    """YaRN (Hugging Face rope_type "yarn"): frequencies turning more than `beta_fast` times
    over the original context are kept, fewer than `beta_slow` times divided by `factor`, a
    linear ramp between; cos and sin are multiplied by `attention_factor` (0: derived)."""

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0


RopeScaling = LinearScaling | Llama3Scaling | YarnScaling


def model_rope_scaling(cfg: ModelConfig) -> RopeScaling | None:
    """The model's scaling parameters, or None when `model.rope_scaling = 'none'`."""
    if cfg.rope_scaling == "linear":
        return LinearScaling(cfg.rope_factor)
    if cfg.rope_scaling == "llama3":
        return Llama3Scaling(
            cfg.rope_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_seq_len,
        )
    if cfg.rope_scaling == "yarn":
        return YarnScaling(
            cfg.rope_factor,
            cfg.rope_original_max_seq_len,
            cfg.rope_beta_fast,
            cfg.rope_beta_slow,
            cfg.rope_attention_factor,
        )
    return None


def attention_factor(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by: 1 but for YaRN, whose default is the paper's
    0.1 ln(factor) + 1 (transformers' `yarn_get_mscale`)."""
    if not isinstance(scaling, YarnScaling):
        return 1.0
    if scaling.attention_factor:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


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


def _yarn_band(s: YarnScaling, head_dim: int, theta: float) -> tuple[float, float]:
    """The frequency indices where YaRN's ramp starts and ends: where a frequency turns
    beta_fast, then beta_slow times over the original context (floored, ceiled, clipped)."""

    def index(rotations: float) -> float:  # j where theta^(2j/K) = original / (2 pi rotations)
        return (head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(index(s.beta_fast)), 0)
    high = min(math.ceil(index(s.beta_slow)), head_dim - 1)
    if low == high:
        return low, high + 0.001  # transformers' guard against 0 / 0
    return low, high


def scale_yarn(base_J: Tensor, s: YarnScaling, head_dim: int, theta: float) -> Tensor:
    """YaRN's frequencies from the per-frequency bases theta^(2j/K) (transformers'
    `_compute_yarn_parameters`, its expression order kept so the result is bit for bit)."""
    low, high = _yarn_band(s, head_dim, theta)
    j_J = torch.arange(base_J.shape[0], dtype=torch.float32, device=base_J.device)
    kept_J = 1 - torch.clamp((j_J - low) / (high - low), 0, 1)  # weight of the unscaled one
    return (1.0 / (s.factor * base_J)) * (1 - kept_J) + (1.0 / base_J) * kept_J


def rope_frequencies(
    head_dim: int,
    theta: float,
    device: torch.device | str | None = None,
    scaling: RopeScaling | None = None,
) -> tuple[Tensor, float]:
    """The inverse frequencies `inv_freq_J` (float32) and the attention factor that cos and
    sin are multiplied by, as transformers' `ROPE_INIT_FUNCTIONS` return them."""
    exponents_J = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    base_J = theta ** (exponents_J / head_dim)
    inv_freq_J = 1.0 / base_J
    if isinstance(scaling, LinearScaling):
        inv_freq_J = inv_freq_J / scaling.factor
    elif isinstance(scaling, Llama3Scaling):
        inv_freq_J = scale_llama3(inv_freq_J, scaling)
    elif isinstance(scaling, YarnScaling):
        inv_freq_J = scale_yarn(base_J, scaling, head_dim, theta)
    return inv_freq_J, attention_factor(scaling)


def rope_cache(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | str | None = None,
    scaling: RopeScaling | None = None,
) -> tuple[Tensor, Tensor]:
    """RoPE tables `(cos_PK, sin_PK)` in float32, in the rotate_half layout.

    Frequency j rotates the pair (j, j + K/2), so both halves of the head dim share one table
    half; this is Hugging Face's layout, which lets its q/k weights load without permutation.
    """
    inv_freq_J, factor = rope_frequencies(head_dim, theta, device, scaling)
    pos_P = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles_PJ = pos_P[:, None] * inv_freq_J[None, :]
    angles_PK = torch.cat([angles_PJ, angles_PJ], dim=-1)
    return angles_PK.cos() * factor, angles_PK.sin() * factor


def model_rope_cache(
    cfg: ModelConfig, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """`rope_cache` for a model config: its head dim, base, length and scaling."""
    return rope_cache(
        resolved_head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, device, model_rope_scaling(cfg)
    )


def _rotate_half(x_BHLK: Tensor) -> Tensor:
    x1, x2 = x_BHLK.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLK: Tensor, cos_LK: Tensor, sin_LK: Tensor) -> Tensor:
    """Rotate queries or keys by their absolute positions (tables already sliced to L)."""
    cos_LK, sin_LK = cos_LK.to(x_BHLK.dtype), sin_LK.to(x_BHLK.dtype)
    return x_BHLK * cos_LK + _rotate_half(x_BHLK) * sin_LK
