"""Run a function on N real processes over gloo, each rendezvousing on a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # Let every rank's in-flight collectives finish: tearing gloo down under a pending
        # async op aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` processes; any failure fails the call.

    `fn` must be a module-level function (it is pickled into the children).
    """
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
