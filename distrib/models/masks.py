"""Boolean "may attend" masks for the backends that take an explicit mask (eager, SDPA).

Three rules combine: causal (j <= i), the same document (when packed documents carry ids), and
a sliding window of `window` positions, this one included (i - window < j, Hugging Face
Mistral's `kv_idx > q_idx - sliding_window`). The diagonal is always allowed, so no row is
fully masked and softmax stays finite.

Shape legend: B batch, L sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_window_mask(L: int, window: int, device: torch.device) -> Tensor:
    """`[L, L]`: causal, and within the last `window` positions when `window > 0`."""
    allowed_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    if window > 0:
        # triu(-(window - 1)) keeps j >= i - window + 1, i.e. i - window < j.
        allowed_LL = allowed_LL.triu(-(window - 1))
    return allowed_LL


def causal_doc_mask(
    L: int, doc_ids_BL: Tensor | None, device: torch.device, window: int = 0
) -> Tensor:
    """Boolean "may attend" mask: `[L, L]` causal (and windowed), or `[B, 1, L, L]` that AND
    the same document when `doc_ids_BL` is given."""
    allowed_LL = causal_window_mask(L, window, device)
    if doc_ids_BL is None:
        return allowed_LL
    same_doc_BLL = doc_ids_BL[:, :, None] == doc_ids_BL[:, None, :]
    return (same_doc_BLL & allowed_LL)[:, None]


def flash_window_size(window: int) -> tuple[int, int]:
    """flash_attn's `window_size=(left, right)` for a causal sliding window of `window`
    positions: query i sees keys i - left .. i + right, so left = window - 1 (and right = 0,
    which causal implies anyway); (-1, -1) is flash_attn's "no window"."""
    return (window - 1, 0) if window > 0 else (-1, -1)
