"""Building the DeepSpeed engine: the model as the native engine starts it, the DeepSpeed config,
the gated optimizer and the LR schedule, handed to `deepspeed.initialize`."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn

from distrib.config import Config, ParallelConfig
from distrib.engines.build import load_initial_weights
from distrib.engines.deepspeed.config import effective_config, offloads_optimizer, zero_stage
from distrib.engines.deepspeed.engine import DeepSpeedEngine
from distrib.engines.deepspeed.env import init_distributed
from distrib.engines.deepspeed.gate import UpdateGate, build_optimizer, install_gate
from distrib.engines.objectives import build_objective
from distrib.engines.optim import build_scheduler
from distrib.models.build import build_on_meta
from distrib.models.lora import apply_lora
from distrib.parallel.activation import apply_ac
from distrib.parallel.compile import apply_compile
from distrib.parallel.dims import ParallelDims
from distrib.parallel.expert import expert_balance
from distrib.parallel.init import materialize
from distrib.runtime import Runtime, import_deepspeed


def build_deepspeed_model(cfg: Config, device: torch.device) -> nn.Module:
    """The whole model as the native engine starts it: on meta, LoRA adapters (if any),
    activation checkpointing and compile applied, then materialized on `device` with the seed's
    initial values, and the `model.init_from` weights loaded."""
    model = build_on_meta(cfg.model)
    apply_lora(model, cfg.lora)
    apply_ac(model, cfg.parallel.activation_checkpoint, cfg.parallel.activation_memory_budget)
    if cfg.training.compile:
        apply_compile(model)
    materialize(model, device, cfg.training.seed)
    load_initial_weights([model], cfg.model)
    return model


def _dp_size(parallel: ParallelConfig, world_size: int) -> int:
    """The data-parallel degree: ZeRO shards over the `dp_shard` axis, which must span every
    process (-1 or the world size; config validation keeps tp, pp and dp_replicate at 1)."""
    return ParallelDims.from_config(parallel, world_size).dp


def build_deepspeed_engine(cfg: Config, runtime: Runtime) -> tuple[DeepSpeedEngine, int, int]:
    """Build the model, the DeepSpeed config, optimizer and schedule, and `deepspeed.initialize`
    them. Returns the engine and this rank's (data-parallel rank, data-parallel size)."""
    deepspeed = import_deepspeed(runtime.device)
    init_distributed(deepspeed, runtime)
    dp_size = _dp_size(cfg.parallel, dist.get_world_size())
    config = effective_config(cfg, dp_size, runtime.device.type)
    if runtime.is_main:
        print(f"deepspeed config: {json.dumps(config, sort_keys=True)}", flush=True)
    stage3 = zero_stage(config) == 3
    # ZeRO-3 partitions from a host copy one parameter at a time (zero.Init below), so the
    # whole model never has to fit on one accelerator.
    model = build_deepspeed_model(cfg, torch.device("cpu") if stage3 else runtime.device)
    gate = UpdateGate()
    # Before partitioning: the parameter groups tell matrices from vectors by their shape, which
    # a partitioned parameter no longer has (the same Parameter objects stay in the groups).
    optimizer = build_optimizer(model, cfg.training, offloads_optimizer(config))
    install_gate(optimizer, gate)
    scheduler = build_scheduler(optimizer, cfg.training)
    if stage3:
        deepspeed.zero.Init(module=model, config_dict_or_path=config)
    ds, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    engine = DeepSpeedEngine(
        ds,
        scheduler,
        gate,
        runtime.device,
        dist.get_rank(),
        training=cfg.training,
        objective=build_objective(cfg),
    )
    engine.experts = expert_balance([engine.model], cfg.model)
    return engine, dist.get_rank(), dp_size
