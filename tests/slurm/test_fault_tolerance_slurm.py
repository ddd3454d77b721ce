"""Fault-tolerant replica groups (`parallel.fault_tolerance`) on the test cluster, submitted by
`slurm/submit_ft.sh`: the torchft lighthouse as a job of its own, the two replica groups as a job
array of `slurm/train.sbatch` (one process each) and a cleanup job. One group's training process
is killed (SIGKILL) while both train: its array task requeues itself, the other group trains on
alone meanwhile, the requeued task resumes its own checkpoint and heals from its peer (its steps
jump forward), both finish with bitwise the same weights and optimizer state, and the cleanup
job cancels the lighthouse."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.slurm.conftest import REPO, Cluster
from tests.support.replicas import assert_same_state
from tests.support.runs import records
from tests.support.tiny import tiny_flags

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
pytest.importorskip("torchft")

SUBMIT = REPO / "slurm" / "submit_ft.sh"
CONFIG = REPO / "configs" / "debug.toml"
STEPS = 500
KILL_AFTER = 60  # and once group 1 has a checkpoint on disk (every 25 steps)
# Each group's only rank sleeps 50 ms a step, so that the run outlasts the killed group's
# absence: the requeued task is held back ~16 s (cred_expire) and takes ~10 s to start.
FT_TRAIN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    f"--training.steps={STEPS}",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--metrics.tensorboard=false",
    "--checkpoint.interval=25",
    "--parallel.fault_tolerance=true",
    "--parallel.dp_replicate=2",
    "--parallel.ft_timeout_s=30",
    "--debug.straggler_rank=0",
    "--debug.straggler_sleep_s=0.05",
]


def _steps(group_dir: Path) -> list[int]:
    return [r["step"] for r in records(group_dir)] if (group_dir / "metrics.jsonl").exists() else []


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _workers(array_job: int, task: int) -> list[psutil.Process]:
    """The training processes (torchrun's workers, not the agent) of one array task."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "distrib.cli" not in cmd or "torch.distributed.run" in cmd or "bash" in cmd:
            continue
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_ARRAY_JOB_ID") == str(array_job) and env.get(
            "SLURM_ARRAY_TASK_ID"
        ) == str(task):
            found.append(proc)
    return found


def test_killed_group_is_requeued_and_heals(
    slurm_cluster: Cluster, data_dir: Path, tmp_path: Path
) -> None:
    submitted = subprocess.run(
        ["bash", str(SUBMIT), "--time=10", "--", str(CONFIG), f"--data.dir={data_dir}", *FT_TRAIN],
        env=slurm_cluster.env(NPROC_PER_NODE="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    ids = dict(re.findall(r"^(\w+)=(.*)$", submitted.stdout, re.MULTILINE))
    array, lighthouse, cleanup = int(ids["groups"]), int(ids["lighthouse"]), int(ids["cleanup"])
    run_dir = tmp_path / ids["run_dir"]
    assert run_dir == tmp_path / "runs" / f"slurm-{array}"  # named after the array
    groups = [run_dir / "group0", run_dir / "group1"]

    def out(task: int) -> str:
        path = tmp_path / f"slurm-{array}_{task}.out"
        return path.read_text() if path.exists() else "(no output file)"

    def running() -> None:
        for task in (0, 1):
            state = slurm_cluster.job(f"{array}_{task}")["JobState"]
            assert state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING"), (
                f"task {task} {state}:\n{out(task)[-6000:]}"
            )

    try:
        # Both groups train together (each sees the other in its quorum).
        def together() -> bool:
            running()
            both = [
                [r for r in records(g) if r.get("replica_groups") == 2]
                if (g / "metrics.jsonl").exists()
                else []
                for g in groups
            ]
            saved = [p for p in groups[1].glob("checkpoints/step-*") if p.suffix != ".tmp"]
            return all(both) and bool(saved) and max(_steps(groups[1])) >= KILL_AFTER

        _wait_for(together, f"both groups training together past step {KILL_AFTER}")
        workers = _workers(array, 1)
        assert len(workers) == 1, workers
        workers[0].send_signal(signal.SIGKILL)
        killed_at = max(_steps(groups[1]))

        # Its task requeues itself; meanwhile the other group trains on alone.
        _wait_for(
            lambda: int(slurm_cluster.job(f"{array}_1")["Restarts"]) >= 1,
            "the killed group's task to requeue itself",
            timeout=60,
        )
        assert slurm_cluster.job(f"{array}_0")["JobState"] == "RUNNING", out(0)[-6000:]
        info = [slurm_cluster.wait(f"{array}_{task}", timeout=240) for task in (0, 1)]
        for task in (0, 1):
            assert info[task]["JobState"] == "COMPLETED", (
                f"task {task}: {info[task]}\n{out(task)[-6000:]}\n{slurm_cluster.daemon_log(array)}"
            )
        # The cleanup job cancels the lighthouse once both groups have ended.
        assert slurm_cluster.wait(cleanup, timeout=60)["JobState"] == "COMPLETED"
        assert slurm_cluster.wait(lighthouse, timeout=60)["JobState"] == "CANCELLED"
    finally:
        for job in (array, lighthouse, cleanup):
            subprocess.run(["scancel", str(job)], env=slurm_cluster.env(), check=False)

    # Group 0 never stopped: every step once, in order, some of them alone. (It may have started
    # a few steps in: whichever group starts first trains alone until the other joins and heals.)
    steps0 = _steps(groups[0])
    assert steps0 == list(range(steps0[0], STEPS + 1)) and steps0[0] < KILL_AFTER, steps0[:20]
    assert "resumed from" not in out(0)
    solo = [
        r["step"]
        for r in records(groups[0])
        if r.get("replica_groups") == 1 and r["step"] > killed_at
    ]
    assert len(solo) >= 10, solo
    # Group 1 was requeued by its own batch script, resumed its checkpoint, then healed from group
    # 0: after the kill its steps jump forward, past where group 0 trained alone.
    log = out(1)
    assert "replica group 1 failed (srun exit" in log and "requeueing" in log, log[-6000:]
    assert "(restart 1)" in log and "resumed from" in log, log[-6000:]
    assert len((groups[1] / "slurm-failures").read_text().splitlines()) == 1
    steps = _steps(groups[1])
    jumps = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b > a + 1]
    assert any(a >= killed_at - 1 and b > min(solo) for a, b in jumps), (killed_at, jumps)
    assert steps[-1] == STEPS
    assert (run_dir / "lighthouse.addr").exists() is False  # removed when the lighthouse ended
    # Afterwards both hold bitwise the same weights, optimizer state, schedule and data position.
    assert_same_state(groups, tmp_path, STEPS)
