"""Exact per-rank counts of a layout's model states, without a single GPU.

The planner (`distrib plan`) must not guess how many parameters a rank holds: FSDP rounds shards
up, tensor parallelism leaves norms whole, a pipeline's first and last stages carry the embedding
and the head, expert weights shard over other axes. So the counts are taken from the real thing:
the model is built on the meta device and parallelized by the same `parallelize` that training
calls, on a DeviceMesh of the layout's full world size inside one process. That mesh runs over
torch's "fake" process group (`torch.testing._internal.distributed.fake_pg`, which torchtitan
uses for the same purpose): collectives are no-ops, every rank's local shapes are the real
ones. Nothing is allocated.

Under a pipeline the stages differ, so each pipeline rank's stages are built and the largest
rank is reported; elsewhere every rank holds the same shapes up to FSDP's rounding, and rank 0
(the first of every axis) holds the largest shard.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrib.config import Config
from distrib.config.rules import split_points, stage_layers
from distrib.errors import ConfigError
from distrib.models.build import build_on_meta
from distrib.models.lora import apply_lora
from distrib.parallel.dims import ParallelDims
from distrib.parallel.parallelize import parallelize
from distrib.parallel.pipeline import build_stage, stages_of_rank


@dataclass(frozen=True)
class StateCounts:
    """Elements one rank holds (its local shards), for the rank that holds the most."""

    params: int  # every parameter, frozen ones included
    trainable: int  # those with gradients and optimizer state
    total_params: int  # the whole model's, for reference
    pp_rank: int  # which pipeline rank these are (0 without a pipeline)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """A process group of `world_size` ranks in which this process is `rank` and collectives do
    nothing. Refused when a real group is already up (the planner runs before any launch)."""
    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without a process group")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _count(parts: list[nn.Module]) -> tuple[int, int]:
    seen: set[int] = set()
    params = trainable = 0
    for part in parts:
        for p in part.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = _local_numel(p)
            params += n
            trainable += n if p.requires_grad else 0
    return params, trainable


def _parts_of(cfg: Config, dims: ParallelDims, pp_rank: int) -> list[nn.Module]:
    """This pipeline rank's model parts on meta, parallelized as training would."""
    mesh = dims.build_mesh("cpu")
    apply = functools.partial(
        parallelize,
        dims=dims,
        mesh=mesh,
        parallel=cfg.parallel,
        training=cfg.training,
        device=torch.device("cpu"),
    )
    if dims.pp == 1:
        model = build_on_meta(cfg.model)
        apply_lora(model, cfg.lora)
        apply(model)
        return [model]
    p = cfg.parallel
    num_stages = dims.pp * p.pp_stages_per_rank
    layers = stage_layers(cfg.model.n_layers, num_stages, split_points(p, cfg.model.n_layers))
    parts = []
    for index in stages_of_rank(pp_rank, dims.pp, p.pp_stages_per_rank, p.pp_schedule):
        part = build_stage(cfg.model, layers[index], index == 0, index == num_stages - 1)
        apply_lora(part, cfg.lora)
        apply(part)
        parts.append(part)
    return parts


def state_counts(cfg: Config, world_size: int) -> StateCounts:
    """The per-rank parameter counts of `cfg`'s layout at `world_size` (see the module
    docstring). Raises ConfigError for a layout that does not fit the world size."""
    if cfg.parallel.engine != "native":
        raise ConfigError("state_counts covers parallel.engine = 'native' layouts only")
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    ranks_per_stage = world_size // dims.pp
    best: StateCounts | None = None
    total = sum(p.numel() for p in build_on_meta(cfg.model).parameters())
    for pp_rank in range(dims.pp):
        # The pp axis is the mesh's outermost: pipeline rank k starts at global rank k * (N / pp).
        with fake_world(world_size, pp_rank * ranks_per_stage):
            params, trainable = _count(_parts_of(cfg, dims, pp_rank))
        if best is None or params > best.params:
            best = StateCounts(params, trainable, total, pp_rank)
    assert best is not None
    return best
