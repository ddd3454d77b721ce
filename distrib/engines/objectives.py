"""What a training step minimizes, behind one call that both engines make per micro-batch.

`TokenObjective` is the next-token cross-entropy of pretraining and of supervised fine-tuning
(SFT differs only in its labels: the prompt tokens are IGNORE_INDEX, and each micro-batch
carries the step's label count as its `loss_denominator`, so every supervised token of the
global batch weighs the same whatever the layout). `DPOObjective` is direct preference
optimization (Rafailov et al., 2023) against reference log-probabilities that the trainer
computed once with the starting model (`distrib.train.reference`).

Legend: B sequences, P preference pairs (B = 2P: the chosen rows, then the rejected ones),
L sequence, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from distrib.config import Config, DPOConfig, TrainingConfig
from distrib.data.loader import Batch
from distrib.models.loss import (
    causal_lm_loss,
    compiled_causal_lm_loss,
    compiled_causal_lm_loss_sum,
    sequence_logps,
)


class Objective(Protocol):
    """The loss of one micro-batch, and the figures beyond the loss that it tracks."""

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        """Forward `batch` through `model` on `device` and return the loss to backpropagate."""
        ...

    def take_metrics(self) -> dict[str, Tensor]:
        """This rank's sums of the objective's figures since the last call, and reset.
        Each value is a tensor [sum, count]; the engine adds them over ranks."""
        ...


def forward_loss(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    loss_chunk_tokens: int = 0,
    compiled: bool = False,
) -> Tensor:
    """The next-token loss of `model` on one micro-batch moved to `device`: the mean over the
    counted labels, or their sum over `batch.loss_denominator` when the batch has one.

    With `loss_chunk_tokens > 0` the model computes the loss itself, its output head and
    cross-entropy in chunks (see `Transformer.forward`); otherwise it returns logits and the
    loss is taken here, by the compiled loss when `compiled`.
    """
    inputs = batch.inputs.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    doc_ids = None if batch.doc_ids is None else batch.doc_ids.to(device, non_blocking=True)
    denominator = batch.loss_denominator
    if loss_chunk_tokens > 0:
        return model(
            inputs,
            doc_ids,
            labels_BL=labels,
            loss_chunk_tokens=loss_chunk_tokens,
            loss_denominator=denominator,
        )
    logits_BLV = model(inputs, doc_ids)
    # Vocab-sharded logits (a DTensor under loss parallelism) take the eager loss, whose
    # DTensor handlers the loss_parallel context installs.
    if compiled and not isinstance(logits_BLV, DTensor):
        if denominator is None:
            return compiled_causal_lm_loss()(logits_BLV, labels)
        return compiled_causal_lm_loss_sum()(logits_BLV, labels) / denominator
    return causal_lm_loss(logits_BLV, labels, denominator)


class TokenObjective:
    """Next-token cross-entropy (pretraining, SFT) with the training section's options."""

    def __init__(self, training: TrainingConfig) -> None:
        self.chunk_tokens = training.loss_chunk_tokens
        self.compiled = training.compile

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        return forward_loss(model, batch, device, self.chunk_tokens, self.compiled)

    def take_metrics(self) -> dict[str, Tensor]:
        return {}


def dpo_loss(
    chosen_P: Tensor,
    rejected_P: Tensor,
    ref_chosen_P: Tensor,
    ref_rejected_P: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss averaged over pairs, and each pair's chosen and rejected rewards.

    Inputs are summed log-probabilities of each response under the policy and the reference.
    The reward of a response is beta * (log pi - log pi_ref); the loss is -log sigmoid of the
    reward margin, or with `label_smoothing` e the conservative form that assumes a share e of
    the preferences is flipped: -(1 - e) log sigmoid(m) - e log sigmoid(-m).
    """
    margin_P = beta * ((chosen_P - ref_chosen_P) - (rejected_P - ref_rejected_P))
    losses_P = -F.logsigmoid(margin_P) * (1 - label_smoothing)
    if label_smoothing:
        losses_P = losses_P - F.logsigmoid(-margin_P) * label_smoothing
    chosen_rewards = beta * (chosen_P - ref_chosen_P).detach()
    rejected_rewards = beta * (rejected_P - ref_rejected_P).detach()
    return losses_P.mean(), chosen_rewards, rejected_rewards


# The figures DPO users read, logged under these names (means over the step's pairs).
DPO_METRICS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
)


class DPOObjective:
    """Direct preference optimization of the policy against precomputed reference
    log-probabilities (`Batch.reference_logps`)."""

    def __init__(self, dpo: DPOConfig) -> None:
        self.beta = dpo.beta
        self.label_smoothing = dpo.label_smoothing
        self._sums: dict[str, Tensor] = {}

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        if batch.reference_logps is None:
            raise ValueError("a DPO batch needs the reference log-probabilities of its rows")
        logps_B = self.sequence_logps(model, batch, device)
        chosen_P, rejected_P = logps_B.chunk(2)
        ref_chosen_P, ref_rejected_P = batch.reference_logps.to(device).float().chunk(2)
        loss, chosen_r, rejected_r = dpo_loss(
            chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, self.beta, self.label_smoothing
        )
        self._add(
            {
                "rewards_chosen": chosen_r,
                "rewards_rejected": rejected_r,
                "reward_margin": chosen_r - rejected_r,
                "reward_accuracy": (chosen_r > rejected_r).float(),
                "logps_chosen": chosen_P.detach(),
                "logps_rejected": rejected_P.detach(),
            }
        )
        return loss

    @staticmethod
    def sequence_logps(model: nn.Module, batch: Batch, device: torch.device) -> Tensor:
        """Summed log-probabilities of each row's counted labels under `model`: `[B]`."""
        inputs = batch.inputs.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        return sequence_logps(model(inputs), labels)

    def _add(self, values: dict[str, Tensor]) -> None:
        for name, value_P in values.items():
            pair = torch.stack([value_P.sum(), value_P.new_tensor(float(value_P.numel()))])
            self._sums[name] = self._sums[name] + pair if name in self._sums else pair

    def take_metrics(self) -> dict[str, Tensor]:
        sums, self._sums = self._sums, {}
        return sums


def build_objective(cfg: Config) -> Objective:
    """The objective `training.objective` names."""
    if cfg.training.objective == "dpo":
        return DPOObjective(cfg.dpo)
    return TokenObjective(cfg.training)
