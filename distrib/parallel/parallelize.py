"""Apply a layout to one model part, always in the same order:
float8 -> TP -> EP -> CP -> AC -> compile -> FSDP/DDP.

Float8 first, since it swaps modules (nn.Linear -> Float8Linear) that every later step wraps or
shards; it refuses TP, whose plan has no float8 styles. TP next, so the later wrappers see
DTensor parameters; activation checkpointing before compile, so the compiled graph contains the
recomputation; FSDP or DDP last, so they wrap compiled blocks and shard what TP left.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distrib.config import ParallelConfig, TrainingConfig
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.context import apply_cp
from distrib.parallel.dims import ParallelDims, submesh
from distrib.parallel.expert import apply_ep
from distrib.parallel.float8 import apply_float8
from distrib.parallel.fsdp import apply_ddp, apply_fsdp
from distrib.parallel.tensor import apply_tp


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh,
    parallel: ParallelConfig,
    training: TrainingConfig,
    device: torch.device | None = None,
) -> None:
    """Parallelize `model` (the whole model or one pipeline stage, still on meta) in place.

    `device` is where it will train; only float8 looks at it (None: the current CUDA device).
    """
    if training.float8:
        apply_float8(model, device, tp=dims.tp)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], parallel.loss_parallel)
    if dims.ep > 1:
        apply_ep(model, mesh["ep"])
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], parallel.cp_mode)
    # Both re-create parameters as DTensors, and torch's SequenceParallel does not carry
    # requires_grad over: refreeze what was frozen (a LoRA model's base) before FSDP wraps it.
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    apply_ac(model, parallel.activation_checkpoint, parallel.activation_memory_budget)
    if training.compile:
        apply_compile(model)
    if uses_fsdp(dims):
        # DDP cannot reduce DTensor gradients; with TP, replication goes through HSDP's
        # replicate axis (a shard degree of 1 shards nothing). Nor does it reduce a pipeline
        # stage's: the schedules run backward themselves, past the hooks DDP's reducer needs
        # (dp_replicate x pp trained each replica on its own gradients), so pipelines replicate
        # through HSDP too, which the pipeline stages drive. The cp ranks see other tokens of
        # the same sequences: FSDP shards over them too and sums their gradients (torchtitan's
        # dp_shard_cp), so cp alone shards like dp_shard.
        hsdp = dims.dp_replicate > 1
        shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
        apply_fsdp(
            model,
            submesh(mesh, "dp_replicate", shard) if hsdp else submesh(mesh, shard),
            training.dtype,
            expert_mesh=(mesh["dp_replicate", "efsdp"] if hsdp else mesh["efsdp"])
            if dims.ep > 1
            else None,
            expert_grad_divisor=dims.dp,
        )
    elif dims.dp_replicate > 1:
        apply_ddp(model, mesh["dp_replicate"])


def uses_fsdp(dims: ParallelDims) -> bool:
    """Whether `parallelize` shards with FSDP2 (which then owns the bfloat16 casting)."""
    replicated = dims.dp_replicate > 1 and (dims.tp > 1 or dims.pp > 1)
    return dims.dp_shard > 1 or dims.cp > 1 or replicated
