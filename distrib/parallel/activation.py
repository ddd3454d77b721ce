"""Activation checkpointing of the transformer blocks, applied to `model.layers` in place.

Each block stays under its key in the ModuleDict, wrapped; the wrapper adds a path segment to
parameter names (`_checkpoint_wrapped_module.`) that `clean_name` and DCP's state-dict helpers
strip, so init and checkpoints keep the plain model's names.

"memory_budget" wraps nothing: it sets the compiler's activation memory budget, so that each
compiled block's partitioner picks what to recompute (it needs `training.compile`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._functorch import config as functorch_config
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from distrib.config.rules import check_activation_checkpoint

# torch's own default: the partitioner saves what it would without a budget.
NO_MEMORY_BUDGET = 1.0


def _ops(namespace: Any, names: tuple[str, ...]) -> set[torch._ops.OpOverload]:
    # getattr with a default: not every op exists on every torch build (2.11-2.13, CPU/CUDA).
    packets = (getattr(namespace, name, None) for name in names)
    return {packet.default for packet in packets if packet is not None}


# Selective AC saves the outputs of the expensive ops and recomputes everything else. The
# matmuls and attention kernels hold nearly all of a block's FLOPs, while the ops between them
# (RMSNorm, RoPE, SiLU, the gate product, residual adds, casts) are elementwise: recomputing
# those costs a few percent of the forward yet frees most of the activations they would pin
# (several [B, L, D] / [B, L, F] tensors per block). Saving every matmul output is thus the
# setting that gives up the least compute for the memory it saves. Under sequence parallelism
# the reduce-scatter outputs are saved too, so the backward does not repeat that collective.
# Float8 (torchao): in eager the policy sees aten.mm on torchao's float8 tensor subclass, but
# under torch.compile the traced graph holds the float8 matmul itself, aten._scaled_mm (newer
# builds: _scaled_mm_v2; MoE: _scaled_grouped_mm), and the reductions that make its scales:
# max (tensorwise amax of abs) and amax (rowwise). Their outputs are a scalar or one number per
# row, so keeping them costs nothing and spares the backward those passes over the activations.
_SAVE_OPS = _ops(
    torch.ops.aten,
    (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "_scaled_mm_v2",
        "_scaled_grouped_mm",
        "max",
        "amax",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    ),
) | _ops(torch.ops._c10d_functional, ("reduce_scatter_tensor",))


def _save_matmuls(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if func in _SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    # PREFER rather than MUST: under torch.compile the partitioner may still choose to save.
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_ac(model: nn.Module, mode: str, memory_budget: float = 0.5) -> None:
    """Checkpoint every block of `model.layers`: "none", "full" (recompute the whole block in
    backward), "selective" (keep matmul and attention outputs, recompute the rest) or
    "memory_budget" (compiled blocks keep `memory_budget`, 0-1, of what they would save
    without checkpointing; the compiler chooses the cheapest recomputation that fits)."""
    # Compile comes after AC, so whether the blocks will be compiled (which the budget mode
    # needs) is config validation's check alone.
    check_activation_checkpoint(mode, memory_budget, compiled=True)
    # A process-wide compiler setting, read when each block's graph is partitioned (its first
    # call). Every mode sets it, so a model built earlier in the same process with a budget
    # cannot leak its budget into this one. No torch API scopes it to one module; torchtitan's
    # memory-budget mode sets the same global.
    functorch_config.activation_memory_budget = (
        memory_budget if mode == "memory_budget" else NO_MEMORY_BUDGET
    )
    if mode in ("none", "memory_budget"):
        return
    # Non-reentrant checkpointing: it supports keyword arguments, selective contexts, DTensor
    # inputs and torch.compile, and needs no input that requires grad.
    kwargs: dict[str, Any] = {"checkpoint_impl": CheckpointImpl.NO_REENTRANT}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    for key, block in list(model.layers.items()):
        model.layers[key] = checkpoint_wrapper(block, **kwargs)
