"""bench/mfu.py's plan: axes, skipped reasons and the greedy walk, without training anything."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import mfu, mfu_plan  # noqa: E402

CPU = mfu.Context("cpu", "float32", 16, "flash attention needs a CUDA device", "no torchao")


def plan(ctx: mfu.Context = CPU, full: bool = False, axes: list[str] | None = None) -> list:
    values = mfu.axis_values([8, 16], 1024, list(mfu.AXES) if axes is None else axes)
    return mfu.build_plan(values, ctx, full)


def test_default_plan_is_baseline_then_one_axis_at_a_time_then_best() -> None:
    stages = plan()
    assert [s.name for s in stages] == ["baseline", *mfu.AXES, "best"]
    assert stages[0].settings == [mfu.Setting(micro_batch_size=8)]
    varied = {s.axis: s.values for s in stages if s.axis}
    assert varied == {
        "compile": [True],
        "attention": ["eager", "flash"],
        "loss_chunk_tokens": [1024],
        "float8": [True],
        "activation_checkpoint": ["selective", "full", "memory_budget"],
        "micro_batch_size": [16],
    }
    # What moves tokens/s most first: a budget that cuts the plan short cuts checkpointing.
    assert list(mfu.AXES)[:3] == ["compile", "loss_chunk_tokens", "micro_batch_size"]
    assert list(mfu.AXES)[-1] == "activation_checkpoint"


def test_cpu_skips_flash_and_float8_with_reasons() -> None:
    ctx = mfu.Context.detect("cpu", "float32", 16)
    skipped = {s.axis: s.skipped for s in plan(ctx) if s.skipped}
    assert set(skipped) == {"attention", "float8"}
    assert "CUDA" in skipped["attention"]["flash"]
    assert "CUDA" in skipped["float8"]["True"]


def test_out_of_memory_ladder_ends_at_full() -> None:
    assert mfu_plan.ac_ladder_after("none") == ("selective", "full")
    assert mfu_plan.ac_ladder_after("selective") == ("full",)
    assert mfu_plan.ac_ladder_after("memory_budget") == ("full",)
    assert mfu_plan.ac_ladder_after("full") == ()


def test_memory_budget_without_compile_is_skipped() -> None:
    eager = mfu.Setting(activation_checkpoint="memory_budget")
    assert "needs compile" in mfu_plan.skip_reason(eager, CPU)
    assert mfu_plan.skip_reason(dataclasses.replace(eager, compile=True), CPU) is None


def test_reasons_on_cuda() -> None:
    no_fa = mfu.Context("cuda", "bfloat16", 16, "flash_attn is not installed", None)
    assert mfu_plan.value_reason("attention", "flash", no_fa) == "flash_attn is not installed"
    assert mfu_plan.value_reason("float8", True, no_fa) is None
    fp32 = dataclasses.replace(no_fa, dtype="float32", flash_missing=None)
    assert "bfloat16" in mfu_plan.value_reason("attention", "flash", fp32)
    assert "multiple" in mfu_plan.value_reason("micro_batch_size", 3, fp32)


def test_axes_restrict_the_plan_and_full_is_the_product() -> None:
    assert [s.name for s in plan(axes=["compile"])] == ["baseline", "compile", "best"]
    (full,) = plan(full=True)
    assert len(full.settings) == 2 * 3 * 2 * 2 * 4 * 2


def fake_measure(tokens: dict[str, float], oom: set[mfu.Setting]) -> tuple[Any, list]:
    """A Measure with tokens/s from the setting's values, OOM for the settings in `oom`."""
    calls: list[mfu.Setting] = []

    def measure(setting: mfu.Setting, stage: str) -> dict[str, Any]:
        calls.append(setting)
        row = {"stage": stage, "setting": dataclasses.asdict(setting), "setting_obj": setting}
        if setting in oom:
            return row | {"status": "oom", "reason": "CUDA out of memory"}
        rate = 1000.0 + sum(tokens.get(str(v), 0.0) for v in dataclasses.astuple(setting))
        return row | {"status": "ok", "tokens_per_s": rate}

    return measure, calls


def test_greedy_walk_keeps_the_best_and_retries_oom_under_checkpointing() -> None:
    gains = {"True": 100.0, "eager": -50.0, "16": 300.0, "selective": -10.0, "full": -20.0}
    gains["memory_budget"] = -15.0
    big = mfu.Setting(compile=True, micro_batch_size=16)
    measure, calls = fake_measure(gains, oom={big})
    rows = mfu.run_plan(plan(), CPU, measure)
    statuses = [(r["stage"], r["status"]) for r in rows]
    assert ("attention", "skipped") in statuses and ("float8", "skipped") in statuses
    # compile won its stage, so every later stage starts from compile=True.
    assert all(s.compile for s in calls[2:])
    # mb 16 ran out of memory without checkpointing and was retried with selective AC.
    assert dataclasses.replace(big, activation_checkpoint="selective") in calls
    best = mfu.quoted_best(rows)
    assert best is not None and best["stage"] == "best"
    assert best["setting"]["micro_batch_size"] == 16
    assert best["setting"]["activation_checkpoint"] == "selective"
    assert len(calls) == len(set(calls)) + 1  # nothing measured twice but the "best" re-run


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("wrapped"),
    ],
)
def test_is_oom_follows_the_cause_chain(err: Exception) -> None:
    if isinstance(err, ValueError):
        err.__cause__ = RuntimeError("CUDA error: out of memory")
    assert mfu.is_oom(err)
    assert not mfu.is_oom(RuntimeError("shape mismatch"))


def test_setting_overrides_load_as_config() -> None:
    from distrib.config import load_config

    s = mfu.Setting(compile=True, attention="eager", activation_checkpoint="full")
    cfg = load_config(ROOT / "configs" / "debug.toml", s.overrides())
    assert cfg.training.compile is True
    assert cfg.model.attention == "eager"
    assert cfg.parallel.activation_checkpoint == "full"
    assert cfg.training.micro_batch_size == 8


def test_speedup_over_cpu_matches_rows_by_setting() -> None:
    def row(stage: str, setting: mfu.Setting, tok_s: float) -> dict[str, Any]:
        return {
            "stage": stage,
            "setting": dataclasses.asdict(setting),
            "status": "ok",
            "tokens_per_s": tok_s,
        }

    base, eager = mfu.Setting(), mfu.Setting(attention="eager")
    cpu = {
        "rows": [row("baseline", base, 100.0), row("attention", eager, 50.0)],
        "best": row("best", base, 100.0),
    }
    gpu = [
        row("baseline", base, 1000.0),
        row("compile", mfu.Setting(compile=True), 2000.0),
        row("best", mfu.Setting(compile=True), 1900.0),
    ]
    out = mfu.speedup_over_cpu(gpu, cpu)
    assert [s["speedup"] for s in out["per_setting"]] == [10.0]
    assert out["best_over_best"] == 19.0
    assert mfu.rerun_ratio(gpu) == 0.95


def test_each_preset_writes_its_own_result_file() -> None:
    # The GPU-over-CPU comparison reads `mfu-cpu-*`; a 1b run the same day must not overwrite
    # the debug preset's file.
    assert mfu.result_kind("debug") == "mfu"
    assert mfu.result_kind("1b") == "mfu-1b"


RUN_GPU = ROOT / "bench" / "run_gpu.sh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--deadline-s", "60"], "--deadline-s must be a whole number of seconds >= 240"),
        (["--budget", "1"], "unknown argument '--budget'"),
        ([], "needs a CUDA GPU: torch.cuda.is_available() is False"),
    ],
)
def test_run_gpu_refuses_bad_arguments_and_a_machine_without_cuda(
    args: list[str], message: str, tmp_path: Path
) -> None:
    import subprocess

    import torch

    if torch.cuda.is_available() and not args:
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        ["bash", str(RUN_GPU), "--python", sys.executable, "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_every_gpu_test_lives_where_run_gpu_looks() -> None:
    # bench/run_gpu.sh runs `pytest -m gpu tests/gpu`: a GPU test elsewhere would never run.
    marker = "pytest.mark." + "gpu"  # spelled in two parts, so this file does not match
    outside = [
        path.relative_to(ROOT)
        for path in (ROOT / "tests").rglob("test_*.py")
        if marker in path.read_text() and path.parent.name != "gpu"
    ]
    assert outside == []
    assert "pytest -m gpu tests/gpu" in RUN_GPU.read_text()
