"""A run folder belongs to one run; generate and export open checkpoints as training does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib import checkpoint as ckpt
from distrib.checkpoint import manifest
from distrib.checkpoint.run import find_checkpoint
from distrib.cli import main
from tests.integration.conftest import train
from tests.support.runs import records


def _steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run / "checkpoints")]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fresh_run_never_inherits_an_old_runs_checkpoints(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """Defect 1: a fresh run (resume = never) in a used folder stopped at step 7 kept the old
    run's step-10, deleted its own step-5, and `resume = auto` then continued the old weights."""
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=10", "--checkpoint.interval=5") == 0
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    before = _snapshot(run)
    capsys.readouterr()
    fresh = ["--training.steps=10", "--checkpoint.interval=5", "--checkpoint.resume=never"]
    assert train(data_dir, run, *fresh, "--training.stop_at_step=7") == 2
    err = capsys.readouterr().err
    assert f"job.run_dir = {run}" in err and "job.overwrite = true" in err
    assert "Traceback" not in err
    assert _snapshot(run) == before  # refused before touching anything

    assert train(data_dir, run, *fresh, "--training.stop_at_step=7", "--job.overwrite=true") == 0
    out = capsys.readouterr().out
    assert "moved the earlier run's files to" in out
    assert _steps(run) == [5, 7]  # its own; the old step-10 moved aside, not kept
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert new_id != old_id
    previous = next((run / "previous").iterdir())
    assert [p.name for p in sorted((previous / "checkpoints").iterdir())] == [
        "step-00000005",
        "step-00000010",
    ]
    assert json.loads((previous / "run.json").read_text())["run_id"] == old_id
    assert [r["step"] for r in records(run)] == list(range(1, 8))  # no old history mixed in

    assert train(data_dir, run, "--training.steps=10", "--checkpoint.interval=5") == 0
    assert (
        f"resumed from {run / 'checkpoints' / 'step-00000007'} at step 7" in capsys.readouterr().out
    )
    for step in (5, 7, 10):
        assert manifest.read(ckpt.step_dir(run / "checkpoints", step))["run_id"] == new_id


def test_overwrite_with_resume_auto_is_refused(data_dir: Path, tmp_path: Path, capsys) -> None:
    """job.overwrite with resume = auto would restart a requeued job from scratch each time."""
    assert train(data_dir, tmp_path / "run", "--job.overwrite=true") == 2
    err = capsys.readouterr().err
    assert "job.overwrite" in err and "checkpoint.resume" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_in_use_is_refused_and_a_crashed_holder_is_not(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    """Defect 2: two runs at once in one folder interleaved their metrics and one died on a DCP
    temporary file. The lock is the kernel's, so a SIGKILLed holder frees it."""
    run = tmp_path / "run"
    holder = ckpt.claim(run, "auto", False)
    try:
        before = _snapshot(run)
        assert train(data_dir, run) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and "pid " in err and "Traceback" not in err
        assert _snapshot(run) == before
    finally:
        holder.release()
    code = (
        "import sys, time; from distrib.checkpoint import claim; "
        "claim(sys.argv[1], 'auto', False); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    assert train(data_dir, run, "--training.steps=2") == 0


def test_unfinished_saves_are_removed_on_the_next_start(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=4") == 0
    leftover = run / "checkpoints" / "step-00000009.tmp"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"half")
    assert train(data_dir, run, "--training.steps=6") == 0
    assert not leftover.exists()
    assert f"removed {leftover}" in capsys.readouterr().out


def test_resume_with_another_model_shape_names_the_tensor(
    data_dir: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=4") == 0
    capsys.readouterr()
    assert train(data_dir, run, "--training.steps=6", "--model.ffn_dim=96") == 2
    err = capsys.readouterr().err
    assert "feed_forward" in err and "[64, 32]" in err and "[96, 32]" in err, err
    assert "job.run_dir" in err and "Traceback" not in err
    assert train(data_dir, run, "--training.steps=6", "--model.n_layers=2") == 2
    err = capsys.readouterr().err
    assert "model.n_layers = 4 there, 2 now" in err, err


def _damage(checkpoint: Path, truncate: bool) -> Path:
    victim = max(
        (p for p in checkpoint.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    if truncate:
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("truncate", [False, True])
def test_generate_and_export_validate_and_fall_back(
    data_dir: Path, tmp_path: Path, capsys, truncate: bool
) -> None:
    """Defect 3: generate and export never validated the checkpoint: a damaged one was exported
    with NaN weights and exit 0, a truncated one gave a raw EOFError."""
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=8") == 0
    newest = ckpt.step_dir(run / "checkpoints", 8)
    victim = _damage(newest, truncate)
    capsys.readouterr()
    assert main(["export", f"--run_dir={run}", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged and is skipped" in err and victim.name in err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert main(["export", f"--run_dir={run}", "--step=8", str(tmp_path / "hf8")]) == 2
    err = capsys.readouterr().err
    assert "step 8" in err and victim.name in err and "Traceback" not in err
    assert not (tmp_path / "hf8").exists()
    assert main(["generate", f"--run_dir={run}", "--max_new_tokens=4"]) == 0
    assert "is damaged and is skipped" in capsys.readouterr().err
    assert main(["generate", f"--run_dir={run}", "--step=8", "--max_new_tokens=4"]) == 2


def test_generate_keeps_to_the_folders_run(data_dir: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint another run wrote (copied in by hand) is not the run's newest."""
    run, other = tmp_path / "run", tmp_path / "other"
    assert train(data_dir, run, "--training.steps=4") == 0
    assert train(data_dir, other, "--training.steps=8") == 0
    time.sleep(0.01)
    (run / "checkpoints" / "step-00000008").mkdir()
    for f in ckpt.step_dir(other / "checkpoints", 8).iterdir():
        (run / "checkpoints" / "step-00000008" / f.name).write_bytes(f.read_bytes())
    assert find_checkpoint(run, None) == ckpt.step_dir(run / "checkpoints", 4)
    assert main(["generate", f"--run_dir={run}", "--step=8", "--max_new_tokens=2"]) == 2
    assert "another run" in capsys.readouterr().err
