"""DeepSpeed's process group: distrib's own (gloo on CPU, nccl on GPU), handed to DeepSpeed."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from distrib.runtime import Runtime


def init_distributed(deepspeed: Any, runtime: Runtime) -> None:
    """Make DeepSpeed use distrib's process group (gloo on CPU, nccl on GPU); one process gets a
    group of its own (DeepSpeed always needs one) held in memory, no port."""
    # DeepSpeed reads these from the environment in places (zero.Init: LOCAL_RANK); srun and
    # mpirun launches, and one process, do not set them.
    for key, value in (
        ("RANK", runtime.rank),
        ("LOCAL_RANK", runtime.launch.local_rank),
        ("WORLD_SIZE", runtime.world_size),
    ):
        os.environ.setdefault(key, str(value))
    if not dist.is_initialized():
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # With torch.distributed already up, DeepSpeed wraps the existing group.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
