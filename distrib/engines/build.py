"""From a config to an engine: the model built on meta, parallelized as the layout says (whole, or
cut into this rank's pipeline stages), materialized, and wrapped in the engine that trains it."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from distrib.config import Config, LoraConfig, ModelConfig
from distrib.config.replica_rules import replica_group_config
from distrib.engines.base import Engine
from distrib.engines.native import NativeEngine
from distrib.engines.objectives import build_objective
from distrib.models.build import build_on_meta
from distrib.models.lora import apply_lora
from distrib.parallel.context import ContextParallel
from distrib.parallel.dims import ParallelDims, dp_coordinate
from distrib.parallel.expert import expert_balance
from distrib.parallel.init import load_hf_weights, materialize
from distrib.parallel.parallelize import parallelize, uses_fsdp
from distrib.parallel.pipeline import build_pipeline
from distrib.parallel.replicas import start_replica_groups
from distrib.parallel.tensor import loss_context
from distrib.runtime import Runtime


def load_initial_weights(parts: list[nn.Module], model: ModelConfig) -> None:
    """Overwrite the materialized parts with the weights `model.init_from` names, if any: a
    Hugging Face folder (`hf:PATH`) or a distrib run's checkpoint (`run:DIR[@STEP]`)."""
    if model.init_from.startswith("hf:"):
        load_hf_weights(parts, model.init_from.removeprefix("hf:"), model)
    elif model.init_from.startswith("run:"):
        from distrib.checkpoint.init_from import load_run_weights
        from distrib.checkpoint.lora_base import refuse_lora_source

        refuse_lora_source(model.init_from)
        load_run_weights(parts, model.init_from)


def adapt_and_parallelize(
    model: nn.Module, lora: LoraConfig, parallelize_part: Callable[[nn.Module], None]
) -> None:
    """Give `model` (whole or a pipeline stage, on meta) its LoRA adapters, if `lora` asks for
    them, then parallelize it: adapters exist before tensor parallelism shards them like the
    layers they sit on, and before FSDP groups them with those layers."""
    apply_lora(model, lora)
    parallelize_part(model)


def build_engine(cfg: Config, runtime: Runtime) -> tuple[Engine, int, int]:
    """Build the model on meta, parallelize it as `cfg.parallel` says (whole, or cut into this
    rank's pipeline stages), materialize it and wrap it in the engine.

    Returns the engine and this rank's (data-parallel rank, data-parallel size). With fault
    tolerance, the layout is one replica group's (the engine's `replicas` joins it to the
    others), and the data-parallel coordinate counts every group's ranks: each group reads its
    own share of the batch.
    """
    replicas = start_replica_groups(cfg, runtime)
    if replicas is None:
        return _build_engine(cfg, runtime)
    engine, dp_rank, dp_size = _build_engine(replica_group_config(cfg), runtime)
    engine.replicas = replicas
    replicas.attach(engine)
    return engine, replicas.index * dp_size + dp_rank, cfg.parallel.dp_replicate * dp_size


def _build_engine(cfg: Config, runtime: Runtime) -> tuple[Engine, int, int]:
    if cfg.parallel.engine == "deepspeed":
        from distrib.engines.deepspeed.build import build_deepspeed_engine

        return build_deepspeed_engine(cfg, runtime)
    dims = ParallelDims.from_config(cfg.parallel, runtime.world_size)
    mesh = dims.build_mesh(runtime.device.type) if runtime.world_size > 1 else None
    apply = functools.partial(
        adapt_and_parallelize,
        lora=cfg.lora,
        parallelize_part=functools.partial(
            parallelize,
            dims=dims,
            mesh=mesh,
            parallel=cfg.parallel,
            training=cfg.training,
            device=runtime.device,
        ),
    )
    loss_ctx = functools.partial(loss_context, dims.tp > 1 and cfg.parallel.loss_parallel)
    seed, pipeline = cfg.training.seed, None
    if dims.pp > 1:
        assert mesh is not None
        pipeline = build_pipeline(
            cfg.model,
            cfg.parallel,
            mesh["pp"],
            runtime.device,
            seed,
            cfg.training.micro_batch_size,
            apply,
            loss_ctx,
        )
        parts = list(pipeline.parts)
    else:
        model = build_on_meta(cfg.model)
        apply(model)
        materialize(model, runtime.device, seed)
        parts = [model]
    load_initial_weights(parts, cfg.model)
    engine = NativeEngine(
        parts,
        cfg.training,
        runtime.device,
        pipeline=pipeline,
        loss_context=loss_ctx,
        autocast=not uses_fsdp(dims),
        pp_group=mesh["pp"].get_group() if mesh is not None and dims.pp > 1 else None,
        num_loss_ranks=dims.dp * dims.cp * dims.tp,
        objective=build_objective(cfg),
        context=ContextParallel(mesh["cp"]) if mesh is not None and dims.cp > 1 else None,
    )
    engine.experts = expert_balance(parts, cfg.model)
    dp_rank, dp_size = dp_coordinate(mesh) if mesh is not None else (0, 1)
    return engine, dp_rank, dp_size
