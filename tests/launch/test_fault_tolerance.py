"""Fault-tolerant replica groups (`parallel.fault_tolerance`) through `launch/train.sh`: a group
killed with SIGKILL leaves the other training, comes back (restarted by torchrun, then
resubmitted), heals from its peer and ends with bitwise the same weights and optimizer state."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.launch.conftest import Launched, run_args, wait_for
from tests.support.replicas import assert_same_state, lighthouse
from tests.support.runs import records

pytestmark = pytest.mark.slow
pytest.importorskip("torchft")

STEPS = 400  # group 0 must still be training when group 1 comes back the second time
# Each group's only rank sleeps 50 ms a step, so that the other group's absence spans steps.
FT_RUN = [
    "--parallel.fault_tolerance=true",
    "--parallel.dp_replicate=2",
    "--parallel.ft_timeout_s=30",
    f"--training.steps={STEPS}",
    "--checkpoint.interval=20",
    "--debug.straggler_rank=0",
    "--debug.straggler_sleep_s=0.05",
]


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir)]


def _at(run_dir: Path, step: int, launched: Launched) -> bool:
    """Whether the run has logged `step`; fails at once if its launch has ended."""
    assert launched.proc.poll() is None, launched.output()
    return max(_steps(run_dir), default=0) >= step


def _checkpoints(run_dir: Path) -> int:
    return len(list((run_dir / "checkpoints").glob("step-*[0-9]")))


def _kill_workers(launched: Launched) -> None:
    """SIGKILL the training processes under the launch (torchrun's agent lives on)."""
    tree = psutil.Process(launched.proc.pid).children(recursive=True)
    agents = [p for p in tree if "torch.distributed.run" in p.cmdline()]
    workers = [w for agent in agents for w in agent.children()]
    assert workers, "no training process to kill"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)


def _kill_all(launched: Launched) -> None:
    """SIGKILL the launch with every process under it: torchrun puts its workers in sessions
    of their own, out of reach of the launch's process group."""
    top = psutil.Process(launched.proc.pid)
    for process in [*top.children(recursive=True), top]:
        process.send_signal(signal.SIGKILL)
    launched.stop()


def test_lost_group_others_train_on_and_it_heals(data_dir: Path, tmp_path: Path, launch) -> None:
    run_dir = tmp_path / "run"
    args = ["bash", "launch/train.sh", *run_args(data_dir, run_dir, *FT_RUN)]

    def start(group: int, name: str) -> Launched:
        return launch(
            name,
            args,
            NGPU="1",
            REPLICA_GROUP=str(group),
            MAX_RESTARTS="1",
            TORCHFT_LIGHTHOUSE=address,
            PYTHON=sys.executable,
        )

    groups = [run_dir / "group0", run_dir / "group1"]
    with lighthouse() as address:
        # Group 0 first: the group furthest on is the one others heal from, so it never jumps.
        first = start(0, "group0")
        wait_for(lambda: _at(groups[0], 1, first), 120, "group 0 at step 1")
        second = start(1, "group1")
        wait_for(
            lambda: _at(groups[1], 1, second) and _checkpoints(groups[1]) >= 1,
            120,
            "group 1 training with a checkpoint of its own",
        )

        # 1. torchrun restarts a killed worker; it resumes its checkpoint, then heals.
        _kill_workers(second)
        killed_at = max(_steps(groups[0]))
        wait_for(
            lambda: max(_steps(groups[1])[-1:], default=0) > killed_at + 10,
            120,
            "group 1 restarted by torchrun and training again",
        )

        # 2. The whole group dies; the other trains on alone; the group is submitted again.
        _kill_all(second)
        wait_for(
            lambda: sum(r.get("replica_groups") == 1 for r in records(groups[0])) >= 10,
            60,
            "group 0 training alone",
        )
        assert first.proc.poll() is None
        third = start(1, "group1-again")
        assert first.wait(300) == 0, first.output()
        assert third.wait(300) == 0, third.output()

    # Group 0 never stopped: every step once, in order, and some of them alone.
    solo = [r["step"] for r in records(groups[0]) if r.get("replica_groups") == 1]
    assert _steps(groups[0]) == list(range(1, STEPS + 1))
    assert len(solo) >= 10 and "resumed from" not in first.output()
    # Group 1 came back twice, each time jumping forward to its peer's step (healed).
    steps = _steps(groups[1])
    # (it may also heal when it first joins, group 0 being a step or two on by then)
    jumps = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b > a + 1 and a >= 20]
    assert len(jumps) >= 2, steps
    assert "resumed from" in second.log.read_text()  # torchrun's restart read its checkpoint
    assert steps[-1] == STEPS
    # Afterwards both hold bitwise the same weights, optimizer state, schedule and data position.
    assert_same_state(groups, tmp_path, STEPS)


def test_a_late_group_of_fsdp_ranks_heals_from_the_other(
    data_dir: Path, tmp_path: Path, launch
) -> None:
    """Groups of two FSDP ranks: group 1 starts when group 0 is well on; its first quorum heals
    it (sharded weights and optimizer moments, rank by rank), and both end identical."""
    run_dir = tmp_path / "run"
    steps = 200  # group 0 must still be training when group 1 has started (4 processes, 2 cores)
    args = [
        "bash",
        "launch/train.sh",
        *run_args(
            data_dir,
            run_dir,
            *FT_RUN,
            f"--training.steps={steps}",
            "--parallel.dp_shard=2",
            "--training.micro_batch_size=2",
        ),
    ]
    groups = [run_dir / "group0", run_dir / "group1"]
    with lighthouse() as address:
        first = launch(
            "group0",
            args,
            NGPU="2",
            REPLICA_GROUP="0",
            TORCHFT_LIGHTHOUSE=address,
            PYTHON=sys.executable,
        )
        wait_for(lambda: _at(groups[0], 15, first), 120, "group 0 at step 15")
        second = launch(
            "group1",
            args,
            NGPU="2",
            REPLICA_GROUP="1",
            TORCHFT_LIGHTHOUSE=address,
            PYTHON=sys.executable,
        )
        assert first.wait(300) == 0, first.output()
        assert second.wait(300) == 0, second.output()
    together = [r["step"] for r in records(groups[0]) if r.get("replica_groups") == 2]
    assert together and together[-1] == steps
    assert _steps(groups[1])[0] > 15  # it started at its peer's step, not at 1
    assert [r["step"] for r in records(groups[0]) if r.get("replica_groups") == 1][0] == 1
    assert_same_state(groups, tmp_path, steps)
