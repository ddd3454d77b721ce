"""`launch/train.sh`: two nodes on one machine train together, and a worker killed with SIGKILL
makes torchrun restart the group, which resumes from the newest checkpoint and finishes."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.launch.conftest import free_port, run_args, wait_for
from tests.support.runs import records

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_on_one_machine(rendezvous: str, data_dir: Path, tmp_path: Path, launch) -> None:
    """NNODES=2 as node 0 and node 1 on 127.0.0.1, one process each: one job of two ranks."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    where = (
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        if rendezvous == "static"
        else {"RDZV_ENDPOINT": f"127.0.0.1:{port}"}
    )
    nodes = [
        launch(
            f"node{rank}",
            ["bash", "launch/train.sh", *run_args(data_dir, run_dir)],
            NNODES="2",
            NODE_RANK=str(rank),
            NGPU="1",
            **where,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        assert node.wait(timeout=240) == 0, node.output()[-6000:]

    steps = records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 9))
    # Two ranks, one per node: each device processed half the tokens.
    assert steps[-1]["tokens_per_s_per_device"] == pytest.approx(steps[-1]["tokens_per_s"] / 2)
    # Each node's rank logs sit in the run folder; rank 0's output was on node 0's console.
    for rank in (0, 1):
        logs = list((run_dir / "logs" / f"node{rank}").glob("*/attempt_0/0/stderr.log"))
        assert len(logs) == 1, sorted(p for p in (run_dir / "logs").rglob("*"))
        assert (logs[0].parent / "stdout.log").exists()
    assert "step 8: saved" in nodes[0].output()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc (procps may be missing)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The parent pid follows the command name, which may itself hold spaces.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _worker(torchrun_pid: int, local_rank: int) -> int | None:
    """The training worker of `local_rank` that torchrun started, if it is running."""
    for pid in _children(torchrun_pid):
        env = _environ(pid)
        if env.get("LOCAL_RANK") == str(local_rank) and "TORCHELASTIC_RESTART_COUNT" in env:
            return pid
    return None


def test_sigkilled_worker_restarts_and_resumes(data_dir: Path, tmp_path: Path, launch) -> None:
    """--max-restarts 1: SIGKILL rank 1 mid-run; torchrun restarts both workers, they resume from
    the newest checkpoint and reach the last step."""
    run_dir = tmp_path / "run"
    overrides = [
        "--training.steps=12",
        "--checkpoint.interval=3",
        # Rank 0 sleeps each step so the run lasts long enough to be interrupted mid-way.
        "--debug.straggler_rank=0",
        "--debug.straggler_sleep_s=0.2",
    ]
    job = launch(
        "train",
        [
            "bash",
            "launch/train.sh",
            "--max-restarts",
            "1",
            *run_args(data_dir, run_dir, *overrides),
        ],
        NGPU="2",
    )

    def past_first_checkpoint() -> bool:
        assert job.proc.poll() is None, job.output()[-6000:]
        return any(r["step"] >= 5 for r in records(run_dir))

    wait_for(past_first_checkpoint, timeout=120, what="step 5 in metrics.jsonl")
    # The script execs torchrun, so the launched process is torchrun; its children are workers.
    victim = _worker(job.proc.pid, local_rank=1)
    assert victim is not None, f"no worker of local rank 1 under torchrun {job.proc.pid}"
    os.kill(victim, signal.SIGKILL)

    assert job.wait(timeout=240) == 0, job.output()[-6000:]
    out = job.output()
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed is not None, out[-6000:]
    at = int(resumed.group(1))
    assert 0 < at < 12 and at % 3 == 0, at  # a checkpoint written before the kill
    # The restarted group trained on from the checkpoint's step to the end.
    steps = [r["step"] for r in records(run_dir)]
    assert steps[-(12 - at) :] == list(range(at + 1, 13)), steps
    assert list((run_dir / "logs" / "node0").glob("*/attempt_1/1/stderr.log")), "no attempt_1"
