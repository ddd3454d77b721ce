"""Materialize a model built on the meta device and parallelized, with layout-invariant values.

Every parameter gets the value the whole, unsharded model would give it (`initial_value` keyed by
seed and name), cut to this rank's shard. So one process, FSDP, TP and pipeline stages all start
from the same numbers, which is what makes their losses comparable step for step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from distrib.config import ModelConfig
from distrib.errors import CheckpointError
from distrib.models.hf import open_hf_folder, read_tensor
from distrib.models.lora import is_adapter
from distrib.models.transformer import Transformer

# Wrappers that insert a path segment into parameter names (activation checkpointing,
# torch.compile of a module); the model's own names are what init is keyed by.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name as the bare model spells it."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """`to_empty(device)`, then fill each parameter (plain or DTensor) from `initial_value`."""
    model.to_empty(device=device)
    model.init_buffers()
    model._retie()  # noqa: SLF001 - to_empty breaks tying in single-module layouts
    for name, param in model.named_parameters():
        full = model.initial_value(clean_name(name), param.shape, device, seed)
        if isinstance(param, DTensor):
            # Every rank computed the same full value, so each keeps its own shard locally:
            # src_data_rank=None skips the scatter from a source rank.
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)


def model_parts_params(parts: list[nn.Module]) -> list[nn.Parameter]:
    """All trainable parameters of the model parts this rank holds (pipeline stages or one)."""
    return [p for part in parts for p in part.parameters() if p.requires_grad]


@torch.no_grad()
def load_full_tensors(parts: list[nn.Module], tensor_of: Callable[[str], Tensor]) -> None:
    """Copy `tensor_of(name)` (a full tensor, by the bare model's parameter name) into every
    parameter of `parts`, each rank keeping its own slice of sharded (DTensor) parameters.

    Every rank reads the same full tensor, so `src_data_rank=None` cuts the local slice without
    a scatter, as `materialize` does for initial values. Parameters stay the same objects, so an
    optimizer built afterwards sees the loaded values. A tied weight appears once. LoRA adapters
    are left as they are: a base model has none.
    """
    for part in parts:
        for name, param in part.named_parameters():
            key = clean_name(name)  # activation checkpointing / compile insert path segments
            if is_adapter(key):
                continue
            try:
                full = tensor_of(key)
            except KeyError:
                raise CheckpointError(f"no tensor for parameter {key}") from None
            if tuple(full.shape) != tuple(param.shape):  # a DTensor's shape is the full shape
                raise CheckpointError(
                    f"tensor for {key} has shape {list(full.shape)}, the model needs "
                    f"{list(param.shape)}"
                )
            full = full.to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                full = distribute_tensor(
                    full, param.device_mesh, param.placements, src_data_rank=None
                )
            param.copy_(full)


def load_hf_weights(parts: list[nn.Module], folder: str, model_cfg: ModelConfig) -> None:
    """Overwrite the parameters of this rank's model parts with a local HF folder's weights
    (any supported architecture, see `distrib.models.hf_families`).

    `parts` are built, parallelized (FSDP2 / TP / EP DTensors, pipeline stages with some layers)
    and materialized; each parameter gets its slice of the full tensor, cast to its dtype; the
    experts of an MoE layer come as one tensor stacked from their per-expert files. The folder's
    config must match `model_cfg` (see `check_config_matches`); every tensor is checked by name
    and shape before anything is read. Buffers are not touched: the RoPE tables are computed
    from the config and the MoE routing bias stays zero (no HF family stores one).
    """
    with open_hf_folder(folder, model_cfg) as weights:
        load_full_tensors(parts, lambda name: read_tensor(weights, name, model_cfg))
