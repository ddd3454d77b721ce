"""mpirun (Open MPI, MPICH, Intel MPI, MVAPICH): rank, size and local rank from the MPI
environment, and rank 0's address and a free port sent to the others over MPI (mpi4py), unless
MASTER_ADDR and MASTER_PORT are exported to every rank.

Only the rendezvous goes through MPI; training itself talks over torch.distributed (gloo or nccl).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from distrib.launchers import LaunchInfo, int_env

# (rank, size, local rank) variables of each MPI implementation's launcher.
_FLAVOURS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (Hydra)
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),  # PMIx launchers
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _route_to(host: str) -> str | None:
    """This host's address on the interface that routes to `host` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def rank0_address(hosts: list[str]) -> str:
    """An address of rank 0's host (`hosts[0]`) that every rank can reach, given each rank's
    host name: loopback when all ranks share the host, else what the name resolves to, unless
    that is a loopback address (Debian maps the host name to 127.0.1.1), in which case the
    address of the interface that routes to another rank's host."""
    own = hosts[0]
    if all(host == own for host in hosts):
        return "127.0.0.1"
    try:
        addr = socket.gethostbyname(own)
    except OSError:
        addr = own
    if not addr.startswith("127."):
        return addr
    peer = next(host for host in hosts if host != own)
    return _route_to(peer) or addr


def _mpi(why: str) -> Any:
    """The mpi4py.MPI module (importing it initializes MPI), or an error saying `why` it is
    needed and how to do without it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"launched by mpirun {why}: install the mpi extra (pip install 'distrib[mpi]', "
            "which brings mpi4py), or export MASTER_ADDR, MASTER_PORT and the local rank to "
            "every rank (Open MPI: mpirun -x MASTER_ADDR -x MASTER_PORT)"
        ) from None
    return MPI


def _check_world(comm: Any, rank: int, size: int) -> None:
    """Fail fast, instead of hanging in the rendezvous, when mpi4py loaded another MPI library
    than the mpirun that started this process (each rank then sees a world of one)."""
    if (comm.Get_rank(), comm.Get_size()) != (rank, size):
        raise RuntimeError(
            f"mpirun says rank {rank} of {size} but mpi4py's MPI library says rank "
            f"{comm.Get_rank()} of {comm.Get_size()}: mpi4py loaded a different MPI than the "
            "mpirun in use. Run the mpirun that belongs to it, or point mpi4py at the right "
            "library (MPI4PY_LIBMPI=libmpi.so.40 for Open MPI, libmpi.so.12 for MPICH)"
        )


def _share_rendezvous(env: Mapping[str, str], rank: int, size: int) -> tuple[str, int]:
    """Rank 0 picks its address (MASTER_ADDR if exported) and a free port (MASTER_PORT if
    exported) and broadcasts them over MPI; every rank must call this."""
    comm = _mpi("without MASTER_ADDR/MASTER_PORT").COMM_WORLD
    _check_world(comm, rank, size)
    hosts = comm.gather(socket.gethostname(), root=0)
    payload = None
    if rank == 0:
        addr = env["MASTER_ADDR"] if "MASTER_ADDR" in env else rank0_address(hosts)
        port = int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
        payload = (addr, port)
    addr, port = comm.bcast(payload, root=0)
    return str(addr), int(port)


def _local_rank_from_mpi() -> int:
    """This rank's index among the ranks on its node, from MPI itself (launchers that do not
    export a local rank)."""
    mpi = _mpi("without a local-rank variable")
    return int(mpi.COMM_WORLD.Split_type(mpi.COMM_TYPE_SHARED).Get_rank())


def detect(env: Mapping[str, str]) -> LaunchInfo | None:
    """The layout of an mpirun rank, or None outside mpirun (and in a world of one, which
    needs no process group: `mpirun -np 1`, or a lone process of a container image that exports
    PMI_* / OMPI_* variables, must not go into mpi4py, as `slurm.detect` skips a one-task step)."""
    for rank_key, size_key, local_key in _FLAVOURS:
        if rank_key not in env or size_key not in env:
            continue
        rank, size = int_env(env, rank_key), int_env(env, size_key)
        if size == 1:
            # Checked before MASTER_* and mpi4py: a stray flavour must not shadow a real one.
            continue
        if "MASTER_ADDR" in env and "MASTER_PORT" in env:
            addr, port = env["MASTER_ADDR"], int_env(env, "MASTER_PORT")
        else:
            addr, port = _share_rendezvous(env, rank, size)
        local_rank = int_env(env, local_key) if local_key in env else _local_rank_from_mpi()
        return LaunchInfo(
            rank=rank,
            world_size=size,
            local_rank=local_rank,
            launcher="mpi",
            master_addr=addr,
            master_port=port,
        )
    return None
