"""Expert parallelism: each MoE layer's experts sharded over the "ep" mesh axis, tokens carried
to them and back by all-to-all; and the cross-rank bookkeeping of expert load.

`apply_ep` turns every `GroupedExperts` into a module whose stacked weights are DTensors sharded
on the expert dim (rank r of the ep group holds experts r*X .. (r+1)*X-1, X = E / ep) and whose
forward is wrapped by torch's `distribute_module` hooks:
  dispatch: rows sorted by global expert -> all-to-all the per-expert counts, then the rows
            (`all_to_all_single_autograd`, so backward is the reverse all-to-all) -> reorder the
            received rows from source-rank-major to local-expert-major;
  combine:  undo the reorder -> all-to-all back, so the MoE layer gets its rows in the order it
            sent them, and weights and sums them as without expert parallelism.
The ep axis is borrowed from the data-parallel shard ranks (dp_shard = efsdp x ep): those see
different tokens, so the all-to-all exchanges real work. FSDP then shards each expert's weights
over "efsdp" (and replicates over dp_replicate), the dense weights over all of dp_shard.

Legend: N routed rows on this rank, E experts, X experts per ep rank, R ep ranks, D model dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from distrib.config import ModelConfig
from distrib.models.moe import GroupedExperts, moe_layers


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    if not isinstance(module, GroupedExperts):
        return
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]))
        module.register_parameter(param_name, sharded)


def _dispatch(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Tensor, ...]:
    x_ND, counts_E = inputs
    ranks = mesh.size()
    group = mesh.get_group()
    counts_RX = counts_E.view(ranks, -1)
    received_RX = torch.empty_like(counts_RX)
    # Counts first (one small exchange), so both sides know the row split sizes.
    dist.all_to_all_single(received_RX, counts_RX, group=group)
    send = counts_RX.sum(dim=1).tolist()
    receive = received_RX.sum(dim=1).tolist()
    x_recv_ND = all_to_all_single_autograd(x_ND, receive, send, group)
    # Received rows come source rank by source rank, each block sorted by local expert; the
    # experts want one block per local expert.
    experts = received_RX.shape[1]
    expert_of_row = torch.arange(experts, device=x_ND.device).repeat(ranks)
    expert_of_row = expert_of_row.repeat_interleave(received_RX.flatten())
    order = torch.argsort(expert_of_row, stable=True)
    module._ep_route = (send, receive, order)  # noqa: SLF001 - read back by _combine
    return x_recv_ND[order], received_RX.sum(dim=0)


def _combine(module: nn.Module, y_ND: Tensor, mesh: DeviceMesh) -> Tensor:
    send, receive, order = module._ep_route  # noqa: SLF001
    del module._ep_route
    y_recv_ND = torch.empty_like(y_ND).index_copy(0, order, y_ND)
    return all_to_all_single_autograd(y_recv_ND, send, receive, mesh.get_group())


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard the experts of every MoE layer in `model` (on meta or real) over the 1-D `ep_mesh`
    and route their rows by all-to-all. Call after TP, before activation checkpointing."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep needs a 1-D mesh (the 'ep' axis), got {ep_mesh.ndim}-D")
    for layer in moe_layers(model).values():
        if layer.num_experts % ep_mesh.size():
            raise ValueError(
                f"{layer.num_experts} experts cannot be split over ep = {ep_mesh.size()} ranks"
            )
        distribute_module(layer.experts, ep_mesh, _shard_experts, _dispatch, _combine)


class ExpertBalance:
    """Expert load across all ranks: DeepSeek-V3's bias balancing after each update, and the
    per-layer metrics (load imbalance, auxiliary losses) the trainer logs.

    Every rank holds some MoE layers (pipeline stages hold different ones, tensor-parallel peers
    the same ones on the same tokens), so counts are summed over the whole world into one
    [n_layers, E] table. Duplicates scale a layer's counts uniformly, which neither the
    balancing (it compares each expert to the mean) nor the imbalance (max / mean) sees.
    """

    def __init__(self, parts: list[nn.Module], n_layers: int, num_experts: int, rate: float):
        self.layers = {int(i): layer for part in parts for i, layer in moe_layers(part).items()}
        self.n_layers, self.num_experts, self.rate = n_layers, num_experts, rate
        # With balancing on, the counts and losses taken at each step since the last report.
        self._pending: Tensor | None = None
        self._pending_losses: Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether the model has MoE layers anywhere (every rank agrees: it is config)."""
        return self.num_experts > 0

    def _device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.expert_bias.device
        return torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")

    def _take(self) -> tuple[Tensor, Tensor]:
        """(counts [n_layers, E], aux/z means + presence [n_layers, 3]) summed over all ranks."""
        device = self._device()
        counts = torch.zeros(self.n_layers, self.num_experts, device=device)
        losses = torch.zeros(self.n_layers, 3, device=device)
        for i, layer in self.layers.items():
            layer_counts, means = layer.take_stats()
            counts[i] = layer_counts
            losses[i, :2] = means
            losses[i, 2] = 1.0
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(losses)
        return counts, losses

    def after_step(self, applied: bool) -> None:
        """With balancing on, move every layer's bias towards uniform load after an update
        (skipped updates leave the bias alone). Called on every rank."""
        if not self.active or self.rate <= 0:
            return
        counts, losses = self._take()
        if applied:
            for i, layer in self.layers.items():
                layer.update_bias(counts[i], self.rate)
        self._pending = counts if self._pending is None else self._pending + counts
        self._pending_losses = losses

    def metrics(self) -> dict[str, Any]:
        """Per MoE layer (`moe_layers`: their block indices): tokens on the busiest expert over
        the mean (`moe_imbalance`), the load-balancing and z losses. Called on every rank."""
        if not self.active:
            return {}
        if self._pending is not None and self._pending_losses is not None:
            counts, losses = self._pending, self._pending_losses
            self._pending = self._pending_losses = None
        else:
            counts, losses = self._take()
        present = losses[:, 2] > 0
        counts, losses = counts[present], losses[present]
        layers = present.nonzero().flatten().tolist()
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        means = losses[:, :2] / losses[:, 2:3]
        rows: dict[str, Any] = {
            "moe_layers": layers,
            "moe_imbalance": [round(v, 4) for v in imbalance.tolist()],
            "moe_aux_loss": [round(v, 6) for v in means[:, 0].tolist()],
            "moe_z_loss": [round(v, 6) for v in means[:, 1].tolist()],
        }
        if rows["moe_imbalance"]:
            rows["moe_imbalance_max"] = max(rows["moe_imbalance"])
        return rows


def expert_balance(parts: list[nn.Module], model: ModelConfig) -> ExpertBalance | None:
    """The engine's expert bookkeeping for a model with MoE layers (None for a dense one)."""
    if model.moe_experts == 0:
        return None
    return ExpertBalance(parts, model.n_layers, model.moe_experts, model.moe_bias_update_rate)
