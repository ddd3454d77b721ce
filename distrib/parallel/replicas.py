"""Fault-tolerant replica groups on torchft (`parallel.fault_tolerance`).

Each of the `parallel.dp_replicate` replica groups is its own torchrun job with its own process
group, and may itself use FSDP, tp and pp. Between groups, torchft's `Manager` does the data
parallelism: every step (or every `training.sync_every` steps) the live groups form a quorum
through the lighthouse and all-reduce over the groups in it. A group that dies leaves the others
training; when it is restarted, the quorum tells it to heal, and it receives the model, optimizer,
schedule, loader position and step from a healthy peer before its next step.

How groups agree (`training.sync`):
- `every_step`: gradients are averaged over the groups after backward, before clipping, and a
  step is applied only if every group in the quorum finished it (`should_commit`).
- `local_sgd` / `diloco`: torchft's `LocalSGD` and `DiLoCo` average parameters (or apply an
  outer Nesterov step on the averaged change) every H inner steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from distrib.config import Config, TrainingConfig
from distrib.errors import UserError

GROUP_ENV = "DISTRIB_REPLICA_GROUP"  # this job's replica group, 0..dp_replicate-1
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own variable: the lighthouse's address


def replica_group_index(cfg: Config, env: dict[str, str] | None = None) -> int:
    """This job's replica group, from the environment the launch scripts set; a clear error
    (before any process group starts) when a fault-tolerant run is started without them."""
    env = dict(os.environ) if env is None else env
    groups = cfg.parallel.dp_replicate
    for name in (GROUP_ENV, LIGHTHOUSE_ENV):
        if not env.get(name):
            raise UserError(
                f"parallel.fault_tolerance = true needs ${name} in the environment (the replica "
                f"group, 0..{groups - 1}, and the torchft lighthouse's http://host:port): "
                "launch/train.sh and slurm/train.sbatch start the lighthouse and the groups"
            )
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise UserError(
            "parallel.fault_tolerance = true needs torchft: pip install 'distrib[ft]'"
        ) from None
    text = env[GROUP_ENV]
    if not text.isdigit() or int(text) >= groups:
        raise UserError(
            f"${GROUP_ENV} = {text!r}: the replica group must be an integer in 0..{groups - 1} "
            f"(parallel.dp_replicate = {groups} groups)"
        )
    return int(text)


def replica_group_run(cfg: Config, index: int) -> Config:
    """The config as replica group `index` runs it: its own run folder inside `job.run_dir`
    (metrics, checkpoints and logs of each group apart; a restarted group resumes from its own)."""
    run_dir = os.path.join(cfg.job.run_dir, f"group{index}")
    return dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, run_dir=run_dir))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_tree(value: Any) -> Any:
    """`value` with every DTensor replaced by this rank's shard: what the checkpoint transport
    sends. Replica groups share one layout, so rank r of one group holds what rank r of another
    holds."""
    if isinstance(value, torch.Tensor):
        return _local(value).detach()
    if isinstance(value, dict):
        return {k: _local_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_local_tree(v) for v in value)
    return value


class ReplicaGroups:
    """This job's place among the replica groups: the torchft manager, the bytes this rank has
    all-reduced over the groups, and the hooks the engine and the loop call."""

    def __init__(
        self,
        cfg: Config,
        index: int,
        rank: int,
        world_size: int,
        device: torch.device,
        store: tuple[str, int] | None = None,
    ) -> None:
        """`store`: where this group's rank 0 hosts the process group's TCPStore, which the
        manager shares (None: MASTER_ADDR / MASTER_PORT, as torchrun exports them)."""
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        p, t = cfg.parallel, cfg.training
        self.index = index
        self.sync = t.sync
        self.sync_every = t.sync_every
        self.training = t
        self.bytes_reduced = 0  # payload this rank has all-reduced over the groups
        self.engine: Any = None
        self.outer: torch.optim.Optimizer | None = None  # DiLoCo's outer optimizer
        timeout = timedelta(seconds=p.ft_timeout_s)
        pg = (
            ProcessGroupNCCL(timeout=timeout)
            if device.type == "cuda"
            else ProcessGroupGloo(timeout)
        )
        self.manager = Manager(
            pg=pg,
            load_state_dict=None,
            state_dict=None,
            min_replica_size=p.min_replica_groups,
            # Healing is applied before the step starts: the forward pass uses the peer's weights.
            use_async_quorum=False,
            timeout=timeout,
            # Under local SGD / DiLoCo a quorum is only formed every H steps.
            quorum_timeout=timeout * (1 if t.sync == "every_step" else t.sync_every + 1),
            connect_timeout=timeout,
            rank=rank,
            world_size=world_size,
            store_addr=store[0] if store else None,
            store_port=store[1] if store else None,
            replica_id=f"distrib_group_{index}",
            # Every group initializes identically from training.seed; a group behind the others
            # heals from them at its first quorum anyway.
            init_sync=False,
        )
        allreduce = self.manager.allreduce

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # Every exchange between groups, whatever the sync mode, goes through here.
            self.bytes_reduced += tensor.numel() * tensor.element_size()
            return allreduce(tensor, *args, **kwargs)

        self.manager.allreduce = counted  # type: ignore[method-assign]

    def register_state(
        self, save: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]
    ) -> None:
        """What a healing group receives from a peer: `save()` on the peer, `load()` here."""
        self.manager.register_state_dict_fn("distrib", load, lambda: _local_tree(save()))

    def resumed_at(self, step: int) -> None:
        """Tell the quorum how far this group is after resuming from its checkpoint (the
        manager counts steps, or synchronizations under local SGD / DiLoCo): the group furthest
        on is the one the others heal from."""
        done = step if self.sync == "every_step" else step // self.sync_every
        self.manager.load_state_dict({"step": done, "batches_committed": 0})

    def begin_step(self) -> None:
        """Before the step's data is read: join this step's quorum (every-step sync), healing
        from a peer first if this group is behind."""
        if self.sync == "every_step":
            self.manager.start_quorum()

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Every-step sync: average this rank's gradient shards over the groups in the quorum,
        one flat buffer per dtype (one collective, not one per tensor)."""
        if self.sync != "every_step":
            return
        grads = [_local(p.grad) for p in params if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            self.manager.allreduce(flat).wait()
            offset = 0
            for g in same:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def commit(self) -> bool:
        """Every-step sync: whether every group in the quorum finished this step, so that its
        update may be applied (all ranks of this group get the same answer). Under local SGD /
        DiLoCo the commit is torchft's own, at each synchronization."""
        if self.sync != "every_step":
            return True
        return self.manager.should_commit()

    def attach(self, engine: Any) -> None:
        """Take the engine this group trains; under DiLoCo, build the outer optimizer over its
        parameters (before any checkpoint is loaded: the checkpoint holds its momentum)."""
        self.engine = engine
        self.outer = outer_optimizer(engine.parts, self.training) if self.sync == "diloco" else None

    @contextlib.contextmanager
    def synchronizing(self, step: int) -> Iterator[None]:
        """Local SGD / DiLoCo around the training loop from `step` on (nothing for every-step
        sync): torchft's classes hook the inner optimizer's step and synchronize every H."""
        if self.sync == "every_step":
            yield
            return
        wrapper = sync_wrapper(self.manager, self.engine, self.training, self.outer)
        # Keep the synchronizations on multiples of H of the run's step, so that a group that
        # resumed or healed mid-round meets the others at the same step (torchft counts from
        # its own start).
        wrapper._local_step = step % self.training.sync_every
        with wrapper:
            yield

    def metrics(self) -> dict[str, Any]:
        """What the step record shows of the groups."""
        return {
            "sync_bytes": self.bytes_reduced,
            "replica_groups": self.manager.num_participants(),
            "replica_group": self.index,
        }

    def shutdown(self) -> None:
        """Stop the manager's server and checkpoint transport."""
        self.manager.shutdown(wait=False)


def outer_optimizer(parts: list[nn.Module], t: TrainingConfig) -> torch.optim.SGD:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the averaged pseudo-gradient
    (the round's start minus its end), as in the DiLoCo paper."""
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=t.outer_lr, momentum=t.outer_momentum, nesterov=t.outer_momentum > 0
    )


def sync_wrapper(
    manager: Any, engine: Any, t: TrainingConfig, outer: torch.optim.Optimizer | None
) -> Any:
    """torchft's `LocalSGD` or `DiLoCo` over the engine's parts and inner optimizer."""
    from torchft.local_sgd import DiLoCo, LocalSGD

    parts: list[nn.Module] = engine.parts
    inner: torch.optim.Optimizer = engine.optimizers[0]  # validated: one part per rank
    if t.sync == "local_sgd":
        return LocalSGD(manager, parts[0], inner, t.sync_every)
    assert outer is not None
    return DiLoCo(
        manager,
        parts,
        inner,
        outer,
        sync_every=t.sync_every,
        pin_memory=torch.cuda.is_available(),
        fragment_sync_delay=t.sync_delay,
        fragment_update_alpha=t.sync_merge if t.sync_delay > 0 else 0.0,
    )


def start_replica_groups(cfg: Config, runtime: Any) -> ReplicaGroups | None:
    """This job's replica group under `parallel.fault_tolerance` (None without it); the
    process group of the job must exist (torchft's manager uses its store)."""
    if not cfg.parallel.fault_tolerance:
        return None
    index = replica_group_index(cfg)
    # torchft's Rust side logs every quorum at INFO: warnings and errors only, unless asked.
    os.environ.setdefault("RUST_LOG", "warn")
    launch = runtime.launch  # srun / mpirun without torchrun: rank 0's address from the launch
    store = (launch.master_addr, launch.master_port) if launch.master_port else None
    return ReplicaGroups(cfg, index, runtime.rank, runtime.world_size, runtime.device, store)


def load_local_state(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], state: dict[str, Any]
) -> None:
    """Copy a peer's `model` and `optimizers` shards (as `_local_tree` sent them) into this
    rank's parameters and optimizers. A group that has not stepped yet has no optimizer state:
    it is rebuilt from the peer's, each tensor placed as its parameter is."""
    for part, received in zip(parts, state["model"], strict=True):
        for name, tensor in part.state_dict().items():
            if name in received:
                _local(tensor).copy_(received[name])
    for opt, received in zip(optimizers, state["optimizers"], strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        placed: dict[Any, Any] = {}
        for index, entry in received["state"].items():
            param = params[int(index)]
            placed[index] = {key: _placed(value, param) for key, value in entry.items()}
        opt.load_state_dict({"state": placed, "param_groups": received["param_groups"]})


def _placed(value: Any, param: torch.Tensor) -> Any:
    """A received optimizer tensor as this rank keeps it: a DTensor laid out like `param` when
    the parameter is one and the tensor has its shape (moments), as it came otherwise (steps)."""
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(param, DTensor) and value.shape == param.to_local().shape and value.dim() > 0:
        local = value.to(param.device)
        return DTensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return value.to(param.device) if value.dim() > 0 else value
