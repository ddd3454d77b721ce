"""`distrib tune` on this machine: the planner's best layouts run for a few steps under
torchrun, measured against predicted; the fastest becomes a config that trains, the measured
efficiency a devices file that `distrib plan` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.commands.tune import calibrated
from distrib.config import load_config
from distrib.planning.hardware import load_devices
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow


def test_calibration_scales_the_efficiency_by_the_median_ratio() -> None:
    cpu = load_devices()["cpu"]
    runs = [
        {"measured_tokens_per_s_per_gpu": m, "predicted_tokens_per_s_per_gpu": 100.0}
        for m in (50.0, 80.0, 200.0)
    ]
    assert calibrated(cpu, runs, float8=False).matmul_efficiency == pytest.approx(
        cpu.matmul_efficiency * 0.8
    )
    assert calibrated(cpu, [], float8=False) == cpu


def test_tune_runs_the_best_layouts_and_writes_config_and_devices(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [
        *tiny_flags(max_seq_len=128),
        f"--data.dir={data_dir}",
        "--data.seq_len=128",
        "--training.global_batch_size=8",
        "--training.micro_batch_size=4",
        "--training.steps=500",
        f"--job.run_dir={tmp_path / 'mine'}",
    ]
    out = tmp_path / "tune"
    args = ["tune", "--nproc", "2", "--top", "2", "--steps", "5", "--dir", str(out)]
    assert main([*args, *flags]) == 0
    assert "fastest:" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert summary["device"] == "cpu" and len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert trial["exit_code"] == 0
        assert trial["measured_tokens_per_s_per_gpu"] > 0
        assert trial["predicted_tokens_per_s_per_gpu"] > 0
        # Each trial trained its own layout for the asked steps.
        run = load_config(Path(trial["config"]))
        assert run.training.steps == 5 and run.checkpoint.interval == 0
    fastest = max(summary["trials"], key=lambda t: t["measured_tokens_per_s_per_gpu"])
    assert summary["best"] == fastest["layout"]
    # best.toml: the user's config (their steps and run folder) with the fastest layout.
    best = load_config(out / "best.toml")
    assert best.training.steps == 500 and best.job.run_dir == str(tmp_path / "mine")
    assert f"mbs={best.training.micro_batch_size}" in fastest["layout"]
    # The calibrated device is read back by distrib plan.
    tuned = load_devices(out / "devices.toml")["cpu"]
    assert tuned.matmul_efficiency == pytest.approx(summary["calibrated"]["matmul_efficiency"])
    plan_args = ["plan", "--gpus", "2", "--gpu", "cpu", "--devices", str(out / "devices.toml")]
    assert main([*plan_args, *flags, "--top", "2"]) == 0
