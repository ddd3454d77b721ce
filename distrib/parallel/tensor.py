"""Tensor parallelism with sequence parallelism (Megatron-style) for the Llama model.

The plan is data: module-name pattern -> ParallelStyle, handed to torch's `parallelize_module`.
Inside a block, attention heads and feed-forward columns are split over the "tp" axis; between
the matmul pairs the residual stream stays sharded on the sequence (sequence parallel), so norms
and residual adds run on L/tp positions and each pair costs one all-gather (before) and one
reduce-scatter (after) instead of an all-reduce.

What flows between modules under this plan (local tensors unless said otherwise):
  tokens_BL (full, every rank) -> tok_embeddings -> h [B, L/tp, D] (this rank's positions)
  block in/out: h [B, L/tp, D]; rope tables and doc_ids_BL stay full, plain tensors
  norm -> DTensor Shard(1) -> output -> logits: DTensor [B, L, V] Shard(-1) with loss_parallel,
  else a plain full [B, L, V] tensor.
A pipeline stage therefore sends and receives its rank's local [B, L/tp, D] sequence shard.

LoRA adapters (distrib.models.lora) are sharded like their base layer, so the adapter path's
output has the base output's layout and the two add up before the output hook: on a colwise
layer A is whole and B split by output rows (x @ A^T is replicated, @ B^T sharded on the last
dim); on a rowwise layer A is split by input columns and B whole (x @ A^T is a partial sum, and
so is @ B^T, reduced together with the base layer's partial output).

Legend: B batch, L sequence, D model dim, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel import loss_parallel as _loss_parallel
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from distrib.models.moe import moe_layers

_ADAPTERS = ("lora_a", "lora_b")


def _shard_adapters(
    style: ParallelStyle,
    module: nn.Module,
    mesh: DeviceMesh,
    placements: dict[str, Placement],
    partition: Callable[[], None],
) -> None:
    # Take the adapters out while torch's partition function shards the base weight (colwise
    # would shard every parameter it finds on dim 0), then put them back as DTensors. The
    # function is the styles' `_partition_linear_fn`: private, but the same through torch 2.x.
    adapters = {name: getattr(module, name) for name in _ADAPTERS if hasattr(module, name)}
    for name in adapters:
        delattr(module, name)
    partition()
    src = getattr(style, "src_data_rank", 0)  # a ParallelStyle attribute since torch 2.6
    for name, param in adapters.items():
        shard = distribute_tensor(param, mesh, [placements[name]], src_data_rank=src)
        module.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))


class AdapterColwiseParallel(ColwiseParallel):
    """ColwiseParallel that also shards a LoRA layer's adapters: lora_a whole, lora_b by
    output rows (as the weight). The same as ColwiseParallel on a plain nn.Linear."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        placements: dict[str, Placement] = {"lora_a": Replicate(), "lora_b": Shard(0)}
        partition = super()._partition_linear_fn
        _shard_adapters(
            self, module, device_mesh, placements, lambda: partition(name, module, device_mesh)
        )


class AdapterRowwiseParallel(RowwiseParallel):
    """RowwiseParallel that also shards a LoRA layer's adapters: lora_a by input columns (as
    the weight), lora_b whole. The same as RowwiseParallel on a plain nn.Linear."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        placements: dict[str, Placement] = {"lora_a": Shard(1), "lora_b": Replicate()}
        partition = super()._partition_linear_fn
        _shard_adapters(
            self, module, device_mesh, placements, lambda: partition(name, module, device_mesh)
        )


def _moe_plan() -> dict[str, ParallelStyle]:
    # An MoE layer is not split over tp: each rank routes and computes all positions (gathered
    # from the sequence shards) with whole expert weights, and keeps its own positions of the
    # output. In backward the output's gradient is gathered back from the shards, so every tp
    # rank computes the same, whole weight gradients and the weights stay plain, replicated
    # tensors that need no tp reduction. Experts are split by expert parallelism instead.
    return {
        "feed_forward": PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(),),
            desired_output_layouts=(Shard(1),),
            use_local_output=True,
        )
    }


def _block_plan(moe: bool = False) -> dict[str, ParallelStyle]:
    # Attention is called as attention(x, rope_cos, rope_sin, doc_ids): only x is gathered; the
    # RoPE tables and doc ids are plain full tensors on every rank (None = leave as is).
    attention: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "attention.wq": AdapterColwiseParallel(),
        "attention.wk": AdapterColwiseParallel(),
        "attention.wv": AdapterColwiseParallel(),
        "attention.wo": AdapterRowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if moe:
        return {**attention, **_moe_plan()}
    return {
        **attention,
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": AdapterColwiseParallel(),
        "feed_forward.w2": AdapterRowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": AdapterColwiseParallel(),
    }


# Qwen3's per-head RMSNorms on queries and keys (model.qk_norm).
_HEAD_NORMS = ("q_norm", "k_norm")


def _head_norm() -> ParallelStyle:
    # Each rank normalizes its own heads ([B, L, heads/tp, K], heads on dim 2) with the whole,
    # replicated weight. As a plain tensor the weight would get only this rank's heads' share of
    # its gradient; as a DTensor with the input marked Shard(2), the backward sums the shares
    # over the tp ranks (the way SequenceParallel norms sum over sequence shards).
    return SequenceParallel(sequence_dim=2, use_local_output=True)


def tp_plan(model: nn.Module, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The tensor + sequence parallel plan for the modules `model` holds (a whole model or a
    pipeline stage without embedding or head), as module-name pattern -> style."""
    plan: dict[str, ParallelStyle] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        # Vocab-parallel embedding: each rank looks up its rows, the partial sums are
        # reduce-scattered straight onto the sequence shards.
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    layers, moe = list(getattr(model, "layers", {})), moe_layers(model)
    if layers and (not moe or len(moe) == len(layers)):  # one kind of block: one pattern each
        plan.update({f"layers.*.{name}": style for name, style in _block_plan(bool(moe)).items()})
    else:  # dense and MoE blocks mixed (moe_dense_layers): a plan per block
        for index in layers:
            block_plan = _block_plan(moe=index in moe)
            plan.update({f"layers.{index}.{name}": style for name, style in block_plan.items()})
    if layers and getattr(model.layers[layers[0]].attention, "q_norm", None) is not None:
        plan.update({f"layers.*.attention.{name}": _head_norm() for name in _HEAD_NORMS})
    if getattr(model, "norm", None) is not None:
        plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        # With loss_parallel the logits stay vocab-sharded (a DTensor) and the cross-entropy
        # reduces over the shards, so the [B, L, V] logits are never gathered.
        plan["output"] = AdapterColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Shard `model` (meta or real) over the 1-D `tp_mesh` in place, following `tp_plan`.

    Call before activation checkpointing, compile and FSDP; on a meta model, `materialize`
    afterwards fills each shard with its slice of the layout-invariant initial value.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D mesh (the 'tp' axis), got {tp_mesh.ndim}-D")
    parallelize_module(model, tp_mesh, tp_plan(model, loss_parallel))
    if getattr(model, "tok_embeddings", None) is not None:
        model.tok_embeddings.register_forward_hook(_settle_async_output)


def _settle_async_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    # The embedding's reduce-scatter is issued async, so its output is an AsyncCollectiveTensor.
    # Fed to a torch.compile'd block, that wrapper breaks the backward (DTensor's redistribute
    # backward receives a plain tensor; seen on torch 2.13). A differentiable op waits and unwraps
    # it, for one [B, L/tp, D] copy; `wait()` would unwrap too but cut the embedding's gradient.
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def loss_context(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Wrap the loss and its backward: `loss_parallel()` when the logits are vocab-sharded."""
    return _loss_parallel() if enabled else contextlib.nullcontext()
