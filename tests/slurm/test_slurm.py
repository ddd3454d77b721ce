"""`slurm/train.sbatch` and `srun` without torchrun on a real two-node Slurm cluster (see
conftest.py): training across nodes; a USR1 and a preemption that each checkpoint, requeue and
resume to the uninterrupted losses; and the environment each launch path sees."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distrib.launchers.slurm import job_port
from tests.slurm.conftest import REPO, SBATCH, Cluster
from tests.support.runs import records
from tests.support.tiny import tiny_flags

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = REPO / "configs" / "debug.toml"
STEPS = 20
TRAIN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    f"--training.steps={STEPS}",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=10",
    "--parallel.dp_shard=-1",
]
# Two nodes, one torchrun per node with two workers each: four ranks.
SBATCH_ARGS = ["--nodes=2", "--time=10"]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run's record of a step replaces the earlier."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def output(cwd: Path, job_id: int) -> str:
    path = cwd / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else "(no output file)"


def assert_completed(
    info: dict[str, str], cwd: Path, job_id: int, cluster: Cluster | None = None
) -> None:
    logs = cluster.daemon_log(job_id) if cluster else ""
    assert info["JobState"] == "COMPLETED", (
        f"job {job_id}: {info}\n{output(cwd, job_id)[-6000:]}\n{logs}"
    )


@pytest.fixture(scope="module")
def reference_job(
    slurm_cluster: Cluster, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, dict[str, str]]:
    """An uninterrupted two-node job, config file as the first argument: (id, folder, info)."""
    cwd = tmp_path_factory.mktemp("sbatch")
    job_id = slurm_cluster.sbatch(
        [*SBATCH_ARGS, str(SBATCH), str(CONFIG), f"--data.dir={data_dir}", *TRAIN],
        cwd,
        NPROC_PER_NODE="2",
    )
    return job_id, cwd, slurm_cluster.wait(job_id)


def test_sbatch_trains_four_ranks_on_two_nodes(reference_job: tuple) -> None:
    job_id, cwd, info = reference_job
    assert_completed(info, cwd, job_id)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    assert "2 nodes x 2 processes, rendezvous at 127.0.0.1:" in output(cwd, job_id)
    run_dir = cwd / "runs" / f"slurm-{job_id}"  # the run folder is keyed by the job id
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.3, curve
    # One checkpoint shard per rank: four ranks took part.
    shards = sorted(
        p.name for p in (run_dir / "checkpoints" / f"step-{STEPS:08d}").glob("*.distcp")
    )
    assert len(shards) == 4, shards


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def interrupted_job(
    cluster: Cluster, data_dir: Path, cwd: Path, interrupt: Callable[[int], None], **env: str
) -> tuple[int, str, Path]:
    """Submit the reference training slowed down, call `interrupt(job_id)` after step 3, wait
    for the requeue and for the requeued job to end: (id, output, run folder)."""
    # Rank 0 sleeps each step (numerics unchanged) so the stop lands well before the end.
    slow = ["--debug.straggler_rank=0", "--debug.straggler_sleep_s=0.5"]
    args = [*SBATCH_ARGS, str(SBATCH), f"--data.dir={data_dir}", *TRAIN, *slow]
    job_id = cluster.sbatch(args, cwd, NPROC_PER_NODE="2", **env)
    run_dir = cwd / "runs" / f"slurm-{job_id}"

    def trained_steps() -> int:
        if cluster.job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"):
            raise AssertionError(f"job ended before the stop:\n{output(cwd, job_id)}")
        return len(losses(run_dir))

    _wait_for(lambda: trained_steps() >= 3, "step 3")
    interrupt(job_id)

    def requeued() -> bool:
        info = cluster.job(job_id)
        assert info["JobState"] not in ("COMPLETED", "FAILED"), output(cwd, job_id)
        return info["JobState"] == "PENDING" and int(info["Restarts"]) >= 1

    _wait_for(requeued, "the requeue")
    # The requeued job starts again by itself after cred_expire (15 s on the test cluster).
    info = cluster.wait(job_id)
    assert_completed(info, cwd, job_id, cluster)
    log = output(cwd, job_id)
    assert "SIGTERM received: checkpoint" in log, log[-6000:]
    assert "(restart 1)" in log and "resumed from" in log, log[-6000:]
    stopped_at = int(log.split("SIGTERM received")[0].rsplit("step ", 1)[1].split(":")[0])
    assert 3 <= stopped_at < STEPS
    return job_id, log, run_dir


def test_usr1_checkpoints_requeues_and_resumes(
    slurm_cluster: Cluster, data_dir: Path, tmp_path: Path, reference_job: tuple
) -> None:
    ref_id, ref_cwd, ref_info = reference_job
    assert_completed(ref_info, ref_cwd, ref_id)

    def usr1(job_id: int) -> None:
        # What `#SBATCH --signal=B:USR1@N` does near the time limit: USR1 to the batch shell.
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))

    # The config from the environment this time.
    _, log, run_dir = interrupted_job(slurm_cluster, data_dir, tmp_path, usr1, CONFIG=str(CONFIG))
    assert "got SIGUSR1: stopping training for a requeue" in log
    # Bit-exact on CPU: the interrupted job trains to the uninterrupted job's losses.
    assert losses(run_dir) == losses(ref_cwd / "runs" / f"slurm-{ref_id}")


def test_preemption_checkpoints_requeues_and_resumes(
    slurm_cluster: Cluster, data_dir: Path, tmp_path: Path, reference_job: tuple
) -> None:
    ref_id, ref_cwd, ref_info = reference_job
    assert_completed(ref_info, ref_cwd, ref_id)

    def preempt(job_id: int) -> None:
        # A job in the higher-tier partition needs both nodes whole: Slurm sends SIGTERM to
        # the training step (not to the batch shell) and requeues after GraceTime.
        args = ["--partition=urgent", "--nodes=2", "--exclusive", "--time=1", "--wrap=sleep 1"]
        slurm_cluster.sbatch(args, tmp_path)

    _, log, run_dir = interrupted_job(
        slurm_cluster, data_dir, tmp_path, preempt, CONFIG=str(CONFIG)
    )
    assert "training stopped (preemption" in log, log[-6000:]
    assert losses(run_dir) == losses(ref_cwd / "runs" / f"slurm-{ref_id}")


def test_srun_without_torchrun_trains_two_ranks(
    slurm_cluster: Cluster, data_dir: Path, tmp_path: Path
) -> None:
    cmd = ["srun", "--nodes=2", "--ntasks=2", "--time=10", "--kill-on-bad-exit=1"]
    train = ["-m", "distrib.cli", "train", f"--config={CONFIG}", f"--data.dir={data_dir}"]
    out = subprocess.run(
        [*cmd, sys.executable, *train, f"--job.run_dir={tmp_path}/run", *TRAIN],
        env=slurm_cluster.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, STEPS + 1))
    shards = list((tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}").glob("*.distcp"))
    assert len(shards) == 2


PROBE = "from distrib.runtime import detect_launch; print(repr(detect_launch()))"


def test_launch_detection_in_batch_script_and_tasks(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """The batch shell is one process; each task of a step knows its rank, the step's size, its
    local rank, and rank 0's NodeAddr with the job's port."""
    script = tmp_path / "probe.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        'echo "batch: $("$PYTHON" -c "$PROBE")"\n'
        'srun --nodes=2 --ntasks=4 --ntasks-per-node=2 "$PYTHON" -c "$PROBE" | sed "s/^/task: /"\n'
        'srun --nodes=1 --ntasks=1 "$PYTHON" -c "$PROBE" | sed "s/^/single: /"\n'
    )
    job_id = slurm_cluster.sbatch(
        ["--nodes=2", "--ntasks-per-node=2", "--time=5", str(script)], tmp_path, PROBE=PROBE
    )
    assert_completed(slurm_cluster.wait(job_id, timeout=120), tmp_path, job_id)
    lines = output(tmp_path, job_id).splitlines()

    def tagged(tag: str) -> list[str]:
        return sorted(line.removeprefix(tag) for line in lines if line.startswith(tag))

    port = job_port(job_id)  # the port comes from the job id
    one = (
        "LaunchInfo(rank=0, world_size=1, local_rank=0, launcher='none', master_addr=None, "
        "master_port=None)"
    )
    assert tagged("batch: ") == [one], lines
    assert tagged("single: ") == [one], lines
    assert tagged("task: ") == [
        f"LaunchInfo(rank={rank}, world_size=4, local_rank={rank % 2}, launcher='slurm', "
        f"master_addr='127.0.0.1', master_port={port})"
        for rank in range(4)
    ], lines
