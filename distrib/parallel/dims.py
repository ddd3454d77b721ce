"""ParallelDims: the degrees of a layout, checked against the world size, and its DeviceMesh.

The mesh always has the four named axes ("pp", "dp_replicate", "dp_shard", "tp"), size 1 where a
kind of parallelism is off, plus the flattened "dp" axis (replicate x shard) that the loader and
the loss average use. Rank order puts tp innermost so tensor-parallel peers are neighbours (the
same node, on a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distrib.config import ParallelConfig, TrainingConfig
from distrib.config.rules import grad_accum_steps, pipeline_microbatches
from distrib.errors import ConfigError

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve a -1 degree from the world size and check the product; messages say which
        numbers clash and what would work."""
        degrees = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp}
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
        dims = cls(**degrees)
        if dims.world_size != world_size:
            n = dims.world_size
            raise ConfigError(
                f"the parallel layout needs a world size of {n} (parallel.dp_replicate "
                f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {dims.tp} x pp {dims.pp}) "
                f"but the launch has {world_size} process(es): launch {n} (e.g. torchrun "
                f"--nproc_per_node={n}), or change the degrees to multiply to {world_size} (one "
                "of them may be -1, inferred from the world size)"
            )
        return dims

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

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
        """The named 4-D mesh over all ranks, with the flattened "dp" axis registered."""
        mesh = init_device_mesh(
            device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=AXES
        )
        # One axis for "all data-parallel ranks", so loader sharding and loss averaging use a
        # single coordinate and group whatever mix of replicate and shard the layout has.
        mesh["dp_replicate", "dp_shard"]._flatten("dp")  # noqa: SLF001 - the public way in torch 2.11-2.13
        return mesh


def dp_coordinate(mesh: DeviceMesh) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process on `mesh`."""
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()
