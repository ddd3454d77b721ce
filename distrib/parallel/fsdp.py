"""Data parallelism: FSDP2 (`fully_shard`), HSDP (replicate x shard) and DDP (`replicate`).

Both wrappers keep parameter names and expose `set_requires_gradient_sync`, so gradient
accumulation skips the reduction on all but the last micro-batch the same way for each.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distrib.models.moe import moe_layers


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """bfloat16 parameters in compute with float32 gradient reduction, or plain float32."""
    if dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    dtype: str,
    expert_mesh: DeviceMesh | None = None,
    expert_grad_divisor: int = 1,
) -> None:
    """Shard each transformer block, then the root (embedding, final norm, output head).

    A 2-D `dp_mesh` (dp_replicate, dp_shard) gives HSDP. Blocks are their own units so only one
    block's full parameters exist at a time; the last block is not resharded after forward
    because backward needs it at once.

    With expert parallelism the experts of each MoE layer are their own unit on `expert_mesh`
    (the data-parallel ranks that hold the same experts). Their gradients already sum the
    tokens of the whole ep group (the all-to-all brings them), so they are divided by the full
    data-parallel degree `expert_grad_divisor`, not only by the size of `expert_mesh`, to be the
    gradient of the mean loss like every other weight's.
    """
    policy = mixed_precision(dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        reshard = i < len(blocks) - 1
        if expert_mesh is not None:
            for layer in moe_layers(block).values():
                fully_shard(
                    layer.experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard
                )
                # FSDP averages over expert_mesh; the rest of the division happens in the
                # experts' backward (FSDP's own divide factor needs PREMUL_SUM, which gloo lacks).
                layer.experts.grad_scale = expert_mesh.size() / expert_grad_divisor
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Replicate the model with gradient all-reduce (DDP), names unchanged."""
    replicate(model, device_mesh=dp_mesh)


def set_gradient_sync(parts: list[nn.Module], enabled: bool) -> None:
    """Turn gradient reduction on (last micro-batch) or off (the others) where a wrapper has it."""
    for part in parts:
        setter = getattr(part, "set_requires_gradient_sync", None)
        if setter is not None:
            setter(enabled)
