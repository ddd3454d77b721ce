"""Apply a layout to one model part, always in the same order: TP -> AC -> compile -> FSDP/DDP.

TP first, so the later wrappers see DTensor parameters; activation checkpointing before
compile, so the compiled graph contains the recomputation; FSDP or DDP last, so they wrap
compiled blocks and shard what TP left.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distrib.config import ParallelConfig, TrainingConfig
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.dims import ParallelDims
from distrib.parallel.fsdp import apply_ddp, apply_fsdp
from distrib.parallel.tensor import apply_tp


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    parallel: ParallelConfig,
    training: TrainingConfig,
) -> None:
    """Parallelize `model` (the whole model or one pipeline stage, still on meta) in place."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], parallel.loss_parallel)
    apply_ac(model, parallel.activation_checkpoint)
    if training.compile:
        apply_compile(model)
    if dims.dp_shard > 1 or (dims.dp_replicate > 1 and dims.tp > 1):
        # DDP cannot reduce DTensor gradients; with TP, replication goes through HSDP's
        # replicate axis (a shard degree of 1 shards nothing).
        apply_fsdp(
            model,
            mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"],
            training.dtype,
        )
    elif dims.dp_replicate > 1:
        apply_ddp(model, mesh["dp_replicate"])


def uses_fsdp(dims: ParallelDims) -> bool:
    """Whether `parallelize` shards with FSDP2 (which then owns the bfloat16 casting)."""
    return dims.dp_shard > 1 or (dims.dp_replicate > 1 and dims.tp > 1)
