"""The causal-LM loss: whole-logits cross-entropy, and a chunked output head + loss.

Both are the mean next-token cross-entropy in float32 whatever the compute dtype. The chunked
form takes the final hidden states and the output weight instead of logits, and never holds the
float32 logits of more than `chunk_tokens` tokens at once, in forward or in backward: at a
128k vocabulary the [tokens x vocab] float32 logits (and their gradient) are often the largest
tensors of a step.

Plain torch, no torch.distributed: the model calls the chunked form from its own forward (under
FSDP2 the output weight is unsharded only there).

Legend: B batch, L sequence, D model dim, V vocabulary, T tokens (B * L), C tokens of one chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# F.cross_entropy's default: labels equal to it count neither in the sum nor in the mean.
IGNORE_INDEX = -100

LossFn = Callable[[Tensor, Tensor], Tensor]


def causal_lm_loss(
    logits_BLV: Tensor, labels_BL: Tensor, denominator: float | None = None
) -> Tensor:
    """Next-token cross-entropy in float32 whatever the compute dtype: the mean over the counted
    labels, or their sum divided by `denominator` when given (see `Batch.loss_denominator`)."""
    if denominator is not None:
        return causal_lm_loss_sum(logits_BLV, labels_BL) / denominator
    return F.cross_entropy(
        logits_BLV.float().flatten(0, 1), labels_BL.flatten(), ignore_index=IGNORE_INDEX
    )


def causal_lm_loss_sum(logits_BLV: Tensor, labels_BL: Tensor) -> Tensor:
    """Summed next-token cross-entropy of the counted labels, in float32."""
    return F.cross_entropy(
        logits_BLV.float().flatten(0, 1),
        labels_BL.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@functools.cache
def compiled_causal_lm_loss() -> LossFn:
    """`causal_lm_loss` under torch.compile, built once per process and shared.

    Compiled, the upcast and the log-softmax fuse into one kernel that reads the compute-dtype
    logits, so the float32 copy of the logits is never written out separately. Cached so that
    every engine and step reuses one compiled function (recompiled only per distinct shape).
    """
    return torch.compile(causal_lm_loss, dynamic=False)


@functools.cache
def compiled_causal_lm_loss_sum() -> LossFn:
    """`causal_lm_loss_sum` under torch.compile: the denominator is divided outside, so a new
    label count each step does not recompile."""
    return torch.compile(causal_lm_loss_sum, dynamic=False)


def sequence_logps(logits_BLV: Tensor, labels_BL: Tensor) -> Tensor:
    """Per sequence, the float32 sum of the log-probabilities of its counted labels: `[B]`.

    What preference losses compare: log pi(response | prompt) with the prompt and the padding
    labelled IGNORE_INDEX."""
    logps_BLV = torch.log_softmax(logits_BLV.float(), dim=-1)
    counted_BL = labels_BL != IGNORE_INDEX
    picked_BL = logps_BLV.gather(-1, labels_BL.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked_BL * counted_BL).sum(-1)


def _chunk_loss_sum(h_CD: Tensor, weight_VD: Tensor, labels_C: Tensor) -> Tensor:
    """Summed float32 cross-entropy of one chunk: logits in the compute dtype, then upcast."""
    logits_CV = F.linear(h_CD, weight_VD)
    return F.cross_entropy(logits_CV.float(), labels_C, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    h_BLD: Tensor,
    weight_VD: Tensor,
    labels_BL: Tensor,
    chunk_tokens: int,
    denominator: float | None = None,
) -> Tensor:
    """`causal_lm_loss(h_BLD @ weight_VD.T, labels_BL, denominator)`, in chunks of
    `chunk_tokens` tokens.

    Equal to the plain loss (and so are its gradients) up to float rounding: each chunk's
    summed loss is added up and divided by the number of counted labels, as the mean does (or
    by `denominator`).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    h_TD, labels_T = h_BLD.flatten(0, 1), labels_BL.flatten()
    total = h_TD.new_zeros((), dtype=torch.float32)
    for h_CD, labels_C in zip(h_TD.split(chunk_tokens), labels_T.split(chunk_tokens), strict=True):
        # Non-reentrant checkpoint saves only the chunk's inputs (views of h and the weight) and
        # drops its logits after forward; backward reruns the chunk, so at most one chunk's
        # logits exist at a time there too. torch's checkpoint does the recompute (and restores
        # autocast), so no hand-written autograd.Function has to get the gradients right.
        total = total + checkpoint(_chunk_loss_sum, h_CD, weight_VD, labels_C, use_reentrant=False)
    if denominator is not None:
        return total / denominator
    # The mean's denominator: every label that is not ignored (all of them for real token ids).
    return total / (labels_T != IGNORE_INDEX).sum()
