"""The checks of fault-tolerant replica groups (`parallel.fault_tolerance`) and of how they
synchronize (`training.sync`): values that cannot work, refused before any process starts."""

from __future__ import annotations

import dataclasses

from distrib.config.sections import Config
from distrib.errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_replicas(cfg: Config) -> None:
    """Fault tolerance and the sync modes, alone and with the rest of the config."""
    p, t = cfg.parallel, cfg.training
    _check(t.optimizer != "sgd" or 0 <= t.momentum < 1, "training.momentum must be in [0, 1)")
    _check(t.sync_every >= 1, f"training.sync_every must be >= 1, got {t.sync_every}")
    _check(0 <= t.sync_merge <= 1, f"training.sync_merge must be in [0, 1], got {t.sync_merge}")
    _check(t.outer_lr > 0, f"training.outer_lr must be > 0, got {t.outer_lr}")
    _check(
        0 <= t.outer_momentum < 1,
        f"training.outer_momentum must be in [0, 1), got {t.outer_momentum}",
    )
    _check(
        0 <= t.sync_delay < t.sync_every,
        f"training.sync_delay ({t.sync_delay}) must be in [0, sync_every - 1 = {t.sync_every - 1}]",
    )
    _check(
        t.sync_delay == 0 or t.sync == "diloco",
        f"training.sync_delay = {t.sync_delay} delays DiLoCo's outer step; with training.sync = "
        f"'{t.sync}' set it to 0",
    )
    if t.sync != "every_step":
        _check(
            p.fault_tolerance,
            f"training.sync = '{t.sync}' synchronizes replica groups through torchft: set "
            "parallel.fault_tolerance = true and parallel.dp_replicate to the number of groups "
            "(launch/train.sh starts them and the lighthouse)",
        )
        every = cfg.checkpoint.interval
        _check(
            every % t.sync_every == 0,
            f"checkpoint.interval ({every}) must be a multiple of training.sync_every "
            f"({t.sync_every}) under training.sync = '{t.sync}': a checkpoint is taken where the "
            "groups have just synchronized, so that a resumed run starts a round as they did",
        )
        _check(
            p.pp_stages_per_rank == 1,
            f"training.sync = '{t.sync}' wraps one optimizer per rank; parallel.pp_stages_per_rank "
            f"= {p.pp_stages_per_rank} gives several: use 1",
        )
    if not p.fault_tolerance:
        return
    groups = p.dp_replicate
    _check(
        groups >= 1,
        f"parallel.fault_tolerance: parallel.dp_replicate is the number of replica groups and "
        f"must be given (>= 1), got {groups}",
    )
    _check(
        1 <= p.min_replica_groups <= groups,
        f"parallel.min_replica_groups ({p.min_replica_groups}) must be in [1, dp_replicate = "
        f"{groups}]",
    )
    _check(p.ft_timeout_s > 0, f"parallel.ft_timeout_s must be > 0, got {p.ft_timeout_s}")
    _check(
        t.global_batch_size % groups == 0,
        f"parallel.fault_tolerance: training.global_batch_size ({t.global_batch_size}) is split "
        f"evenly over the dp_replicate = {groups} replica groups and must be a multiple of it",
    )
    refused = {
        "parallel.engine = 'deepspeed'": p.engine == "deepspeed",
        "training.objective = 'dpo'": t.objective == "dpo",
        # A rollback reloads one group's checkpoint while the others train on.
        "training.on_nonfinite = 'rollback'": t.on_nonfinite == "rollback",
    }
    for what, bad in refused.items():
        _check(not bad, f"parallel.fault_tolerance is not supported with {what}")


def replica_group_config(cfg: Config) -> Config:
    """The config one replica group trains: the same, without the dp_replicate degree (that is
    the number of groups) and with its share of the global batch."""
    groups = cfg.parallel.dp_replicate
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, dp_replicate=1),
        training=dataclasses.replace(
            cfg.training, global_batch_size=cfg.training.global_batch_size // groups
        ),
    )
