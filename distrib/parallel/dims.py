"""ParallelDims: the degrees of a layout, checked against the world size, and its DeviceMesh.

The mesh always has the five named axes ("pp", "dp_replicate", "dp_shard", "cp", "tp"), size 1
where a kind of parallelism is off, plus the flattened "dp" axis (replicate x shard) that the
loader uses and "dp_shard_cp" (shard x cp) over which FSDP shards and reduces: the cp ranks hold
different tokens of the same sequences, so their gradients are summed like data-parallel ones
(torchtitan's layout). Rank order puts tp innermost so tensor-parallel peers are neighbours (the
same node, on a cluster), cp next.

With expert parallelism (ep > 1) the shard axis is built as two, ("efsdp", "ep"), and "dp_shard"
is their flattening: experts are split over "ep" and FSDP-sharded over "efsdp", the dense
weights FSDP-sharded over all of "dp_shard" as without experts (ep with cp > 1 is refused).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distrib.config import ParallelConfig, TrainingConfig
from distrib.config.rules import grad_accum_steps, pipeline_microbatches
from distrib.errors import ConfigError

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_AXES = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int = 1
    cp: int = 1

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve a -1 degree from the world size and check the product; messages say which
        numbers clash and what would work."""
        degrees = {
            "dp_replicate": p.dp_replicate,
            "dp_shard": p.dp_shard,
            "cp": p.cp,
            "tp": p.tp,
            "pp": p.pp,
        }
        known = 1
        for value in degrees.values():
            known *= value if value > 0 else 1
        for key, value in degrees.items():
            if value == -1:
                if world_size % known:
                    raise ConfigError(
                        f"parallel.{key} = -1 cannot be inferred: the other degrees multiply to "
                        f"{known}, which does not divide the world size {world_size}"
                    )
                degrees[key] = world_size // known
        dims = cls(**degrees, ep=p.ep)
        if dims.world_size != world_size:
            n = dims.world_size
            raise ConfigError(
                f"the parallel layout needs a world size of {n} (parallel.dp_replicate "
                f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp} "
                f"x pp {dims.pp}) "
                f"but the launch has {world_size} process(es): launch {n} (e.g. torchrun "
                f"--nproc_per_node={n}), or change the degrees to multiply to {world_size} (one "
                "of them may be -1, inferred from the world size)"
            )
        if dims.ep > 1 and dims.cp > 1:
            raise ConfigError(
                f"parallel.ep ({dims.ep}) with parallel.cp ({dims.cp}) is not supported yet: "
                "set one of them to 1"
            )
        if dims.dp_shard % dims.ep:
            raise ConfigError(
                f"parallel.ep ({dims.ep}) must divide parallel.dp_shard ({dims.dp_shard}): expert "
                "parallelism borrows its ranks from the sharded data-parallel ones; valid ep: "
                f"{[e for e in range(1, dims.dp_shard + 1) if dims.dp_shard % e == 0]}"
            )
        return dims

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step processes at once."""
        return self.dp_replicate * self.dp_shard

    def check_batch(self, training: TrainingConfig, parallel: ParallelConfig) -> int:
        """Gradient-accumulation steps per optimizer step at this data-parallel degree; with a
        pipeline, also the cut of each micro-batch into pipeline micro-batches."""
        accum = grad_accum_steps(training, self.dp)
        if self.pp > 1:
            pipeline_microbatches(parallel, training.micro_batch_size)
        return accum

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The named 5-D mesh over all ranks (6-D with ep > 1), with the flattened "dp" axis
        registered, and "dp_shard_cp" (or, with ep > 1, "dp_shard")."""
        if self.ep > 1:
            shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, 1, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=EP_AXES)
            mesh["efsdp", "ep"]._flatten("dp_shard")  # noqa: SLF001
            mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")  # noqa: SLF001
            return mesh
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        # One axis for "all data-parallel ranks", so loader sharding and loss averaging use a
        # single coordinate and group whatever mix of replicate and shard the layout has.
        mesh["dp_replicate", "dp_shard"]._flatten("dp")  # noqa: SLF001 - the public way in torch 2.11-2.13
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # noqa: SLF001
        return mesh


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    """`mesh[names]`, where names may include the flattened axes ("dp", and "dp_shard" with
    ep > 1), without torch's notice on every rank that slicing a flattened dim from the root
    "will be deprecated": torch 2.11-2.13 have no other way to take a 2-D slice such as
    (dp_replicate, flattened dp_shard), which HSDP with expert parallelism needs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        return mesh[names[0] if len(names) == 1 else names]


def dp_coordinate(mesh: DeviceMesh) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process on `mesh`."""
    dp = submesh(mesh, "dp")
    return dp.get_local_rank(), dp.size()
