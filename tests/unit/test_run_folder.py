"""Run-folder ownership at world size 1: claiming, retention and resume by run id, and the
one-line cause of a failed save."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from distrib import checkpoint as ckpt
from distrib.checkpoint.checkpointer import cause
from distrib.config import CheckpointConfig
from distrib.errors import CheckpointError, ConfigError


def _save(run: Path, owner: ckpt.RunFolder, steps: tuple[int, ...], keep: int = 0) -> None:
    saver = ckpt.Checkpointer(CheckpointConfig(keep=keep), run, owner=owner)
    for step in steps:
        saver.save(step, {"w": torch.full((4,), float(step)), "step": step})


def test_retention_and_resume_only_touch_the_runs_own_checkpoints(tmp_path: Path) -> None:
    """Another run's step-10 in the folder is neither resumed from nor pruned."""
    first = ckpt.claim(tmp_path, "auto", False)
    _save(tmp_path, first, (10,))
    first.release()
    (tmp_path / "run.json").unlink()  # as if copied in from elsewhere
    second = ckpt.claim(tmp_path, "auto", False)
    assert second.adopted and second.run_id != first.run_id
    second.adopted = False  # a run with an identity of its own
    _save(tmp_path, second, (3, 5, 7), keep=2)
    saver = ckpt.Checkpointer(CheckpointConfig(keep=2), tmp_path, owner=second)
    steps = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == ["step-00000005", "step-00000007", "step-00000010"]
    assert saver.resume_path() == tmp_path / "checkpoints" / "step-00000007"
    foreign = CheckpointConfig(resume=str(tmp_path / "checkpoints" / "step-00000010"))
    with pytest.raises(CheckpointError, match="another run"):
        ckpt.Checkpointer(foreign, tmp_path, owner=second).resume_path()
    second.release()


def test_claim_decides_continue_refuse_or_move_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fresh = ckpt.claim(run, "never", False)  # an empty folder: nothing to refuse
    _save(run, fresh, (2,))
    fresh.release()
    again = ckpt.claim(run, "auto", False)
    assert again.run_id == fresh.run_id
    again.release()
    with pytest.raises(ConfigError, match=r"holds run \w{8} .*step-00000002"):
        ckpt.claim(run, "never", False)
    moved = ckpt.claim(run, "never", True)
    assert moved.run_id != fresh.run_id
    (old,) = (run / "previous").iterdir()
    assert json.loads((old / "run.json").read_text())["run_id"] == fresh.run_id
    assert (old / "checkpoints" / "step-00000002").is_dir()
    assert sorted(p.name for p in run.iterdir()) == [".lock", "previous", "run.json"]
    moved.release()


def test_launcher_logs_are_no_runs_history(tmp_path: Path) -> None:
    """launch/train.sh writes <run_dir>/logs before training: not a reason to refuse a fresh
    run, and not moved aside with an old run (the launcher is writing them)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank0.log").write_text("starting\n")
    first = ckpt.claim(tmp_path, "never", False)
    _save(tmp_path, first, (1,))
    first.release()
    ckpt.claim(tmp_path, "never", True).release()
    assert (tmp_path / "logs" / "rank0.log").read_text() == "starting\n"
    (old,) = (tmp_path / "previous").iterdir()
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "run.json"]


def test_a_checkpoint_from_elsewhere_starts_a_new_run(tmp_path: Path) -> None:
    source = ckpt.claim(tmp_path / "a", "auto", False)
    _save(tmp_path / "a", source, (4,))
    source.release()
    path = tmp_path / "a" / "checkpoints" / "step-00000004"
    started = ckpt.claim(tmp_path / "b", str(path), False)
    doc = json.loads((tmp_path / "b" / "run.json").read_text())
    assert doc["started_from"] == str(path.resolve()) and started.run_id != source.run_id
    started.release()
    own = ckpt.claim(tmp_path / "a", str(path), False)  # its own folder: the same run goes on
    assert own.run_id == source.run_id
    own.release()


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    holder = ckpt.claim(tmp_path, "auto", False)
    with pytest.raises(ConfigError, match="in use by another run .*pid"):
        ckpt.claim(tmp_path, "auto", False)
    holder.release()
    ckpt.claim(tmp_path, "auto", False).release()


def test_a_failed_save_names_the_first_ranks_error_in_one_line(tmp_path: Path) -> None:
    stack = traceback.extract_stack()
    err = CheckpointException("save failed", {1: (OSError(28, "No space left"), stack)})
    assert cause(err) == "rank 1: OSError: [Errno 28] No space left"

    saver = ckpt.Checkpointer(CheckpointConfig(), tmp_path)

    def failing_writer(state: object) -> object:
        def write(folder: Path, background: bool) -> None:
            raise err

        return write

    saver._writer = failing_writer  # type: ignore[method-assign]
    with pytest.raises(CheckpointError) as raised:
        saver.save(3, {"step": 3})
    message = str(raised.value)
    assert "\n" not in message and "No space left" in message and "Traceback" not in message
    assert not (tmp_path / "checkpoints" / "step-00000003.tmp").exists()
