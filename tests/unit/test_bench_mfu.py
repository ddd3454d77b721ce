"""bench.mfu's plan: axes, skipped reasons and the walk (the likely best first), without
training anything; and bench/run_gpu.sh's argument checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import mfu, mfu_plan, mfu_report, mfu_worker
from bench.mfu_plan import Context, Setting

ROOT = Path(__file__).resolve().parents[2]
CPU = Context("cpu", "float32", 16, "flash attention needs a CUDA device", "no torchao")
# An H100 with flash_attn and torchao (and the cuDNN backend, where distrib has one).
H100 = Context("cuda", "bfloat16", 16, None, None)
FASTEST = mfu_plan.CUDNN_BACKEND or "flash"


def plan(
    ctx: Context = CPU, full: bool = False, axes: list[str] | None = None, mbs: tuple = (8, 16)
) -> list:
    values = mfu_plan.axis_values(list(mbs), 1024, list(mfu_plan.AXES) if axes is None else axes)
    return mfu_plan.build_plan(values, ctx, full)


def test_plan_tries_the_likely_best_first_then_one_axis_at_a_time() -> None:
    stages = plan(H100, mbs=(2, 4, 8))
    first = stages[0]
    # compile, the chunked loss, the fastest attention that runs and the largest micro-batch,
    # then the next smaller sizes should that one not fit.
    assert (first.name, first.axis, first.first_fit) == ("likely_best", "micro_batch_size", True)
    assert first.start == Setting(True, FASTEST, 1024, False, "none", 8)
    assert first.values == [8, 4, 2]
    assert [s.name for s in stages] == [
        "likely_best",
        "attention",
        "micro_batch_size",
        "float8",
        "loss_chunk_tokens",
        "compile",
        "activation_checkpoint",
        "attention",  # eager, the slow reference, after every other axis
        "baseline",
        "best",
    ]
    varied = [(s.axis, s.values) for s in stages[1:] if s.axis]
    fast = [a for a in mfu_plan.FAST_ATTENTION if a not in (FASTEST, "eager")]
    assert varied == [
        ("attention", fast),
        ("micro_batch_size", [4, 2]),
        ("float8", [True]),
        ("loss_chunk_tokens", [0]),
        ("compile", [False]),
        ("activation_checkpoint", ["selective", "full", "memory_budget"]),
        ("attention", ["eager"]),
    ]
    assert stages[-2].settings == [Setting(micro_batch_size=2)]  # the first value of every axis


def test_attention_prefers_cudnn_then_flash_and_leaves_eager_last() -> None:
    if mfu_plan.CUDNN_BACKEND is None:
        # distrib.models.attention has no cuDNN-first backend: the axis cannot pin it apart.
        assert "sdpa" in mfu_plan.BACKENDS and not any("cudnn" in b for b in mfu_plan.BACKENDS)
        assert mfu_plan.FAST_ATTENTION == ("flash", "sdpa", "eager")
    else:
        assert mfu_plan.FAST_ATTENTION[0] == mfu_plan.CUDNN_BACKEND
    assert mfu_plan.preferred("attention", ["sdpa", "eager", "flash"]) == ["flash", "sdpa", "eager"]
    assert mfu_plan.preferred("micro_batch_size", [2, 8, 4]) == [8, 4, 2]
    assert mfu_plan.preferred("loss_chunk_tokens", [0, 8192]) == [8192, 0]


def test_cpu_plan_guesses_what_runs_here_and_skips_flash_and_float8_with_reasons() -> None:
    ctx = Context.detect("cpu", "float32", 16)
    stages = plan(ctx)
    assert stages[0].start == Setting(True, "sdpa", 1024, False, "none", 16)
    skipped = {s.axis: s.skipped for s in stages if s.skipped}
    assert set(skipped) == {"attention", "float8"}
    assert "CUDA" in skipped["attention"]["flash"]
    assert "CUDA" in skipped["float8"]["True"]


def test_memory_budget_without_compile_is_skipped() -> None:
    eager = Setting(activation_checkpoint="memory_budget")
    assert "needs compile" in mfu_plan.skip_reason(eager, CPU)
    assert mfu_plan.skip_reason(dataclasses.replace(eager, compile=True), CPU) is None


def test_reasons_on_cuda() -> None:
    no_fa = Context("cuda", "bfloat16", 16, "flash_attn is not installed", None)
    assert mfu_plan.value_reason("attention", "flash", no_fa) == "flash_attn is not installed"
    assert mfu_plan.value_reason("float8", True, no_fa) is None
    fp32 = dataclasses.replace(no_fa, dtype="float32", flash_missing=None)
    assert "bfloat16" in mfu_plan.value_reason("attention", "flash", fp32)
    assert "multiple" in mfu_plan.value_reason("micro_batch_size", 3, fp32)


def test_axes_restrict_the_plan_and_full_is_the_product() -> None:
    names = [s.name for s in plan(axes=["compile"])]
    assert names == ["likely_best", "compile", "baseline", "best"]
    (full,) = plan(full=True)
    n_attention = len(mfu_plan.axis_values([8], 0, ["attention"])["attention"])
    assert len(full.settings) == 2 * n_attention * 2 * 2 * 4 * 2


def fake_measure(tokens: dict[str, float], oom: set[Setting]) -> tuple[Any, list]:
    """A Measure with tokens/s from the setting's values, OOM for the settings in `oom`."""
    calls: list[Setting] = []

    def measure(setting: Setting, stage: str) -> dict[str, Any]:
        calls.append(setting)
        row = {"stage": stage, "setting": dataclasses.asdict(setting), "setting_obj": setting}
        if setting in oom:
            return row | {"status": "oom", "reason": "CUDA out of memory"}
        rate = 1000.0 + sum(tokens.get(str(v), 0.0) for v in dataclasses.astuple(setting))
        return row | {"status": "ok", "tokens_per_s": rate}

    return measure, calls


def test_walk_falls_back_to_selective_then_a_smaller_micro_batch_and_keeps_the_best() -> None:
    gains = {"True": 100.0, "eager": -50.0, "16": 300.0, "selective": -10.0, "full": -20.0}
    big = Setting(True, "sdpa", 1024, False, "none", 16)
    selective = dataclasses.replace(big, activation_checkpoint="selective")
    measure, calls = fake_measure(gains, oom={big, selective})
    rows = mfu_plan.run_plan(plan(), CPU, measure)
    # mb 16 ran out of memory, also under selective; mb 8 then fit, ending the first stage.
    assert calls[:3] == [big, selective, dataclasses.replace(big, micro_batch_size=8)]
    assert [r["stage"] for r in rows[:3]] == ["likely_best"] * 3
    # Every later stage starts from the best so far (compile on, mb 8).
    later = [r["setting"] for r in rows[3:] if r["stage"] not in ("compile", "baseline")]
    assert later and all(s["compile"] for s in later)
    assert [r["setting"]["micro_batch_size"] for r in rows if r["stage"] == "float8"] == [8]
    best = mfu_report.quoted_best(rows)
    assert best is not None and best["stage"] == "best"
    assert best["setting_obj"] == dataclasses.replace(big, micro_batch_size=8)
    assert len(calls) == len(set(calls)) + 1  # nothing measured twice but the "best" re-run
    assert mfu_plan.plan_complete(rows)


def test_walk_stops_the_first_stage_at_the_largest_size_that_fits() -> None:
    measure, calls = fake_measure({}, oom=set())
    rows = mfu_plan.run_plan(plan(H100, mbs=(2, 4, 8)), H100, measure)
    assert [r["stage"] for r in rows].count("likely_best") == 1
    assert calls[0] == Setting(True, FASTEST, 1024, False, "none", 8)
    # An out-of-memory size in the micro-batch stage climbs the whole ladder.
    on_row: list[int] = []
    four = Setting(True, FASTEST, 1024, False, "none", 4)
    sel = dataclasses.replace(four, activation_checkpoint="selective")
    measure, calls = fake_measure({"8": -500.0}, oom={four, sel})
    mfu_plan.run_plan(plan(H100, mbs=(2, 4, 8)), H100, measure, lambda r: on_row.append(len(r)))
    assert dataclasses.replace(four, activation_checkpoint="full") in calls
    assert on_row == list(range(1, len(on_row) + 1))  # called after every row, skipped ones too


def test_rows_left_by_a_time_limit_make_the_plan_incomplete() -> None:
    done = {"stage": "likely_best", "status": "ok", "tokens_per_s": 1.0}
    assert mfu_plan.plan_complete([done, {"stage": "float8", "status": "skipped"}])
    assert not mfu_plan.plan_complete([done, {"stage": "compile", "status": "not_run"}])
    assert not mfu_plan.plan_complete([done, {"stage": "compile", "status": "timeout"}])
    assert not mfu_plan.plan_complete([])


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
    assert mfu_worker.is_oom(err)
    assert not mfu_worker.is_oom(RuntimeError("shape mismatch"))


def test_setting_overrides_load_as_config() -> None:
    from distrib.config import load_config

    s = Setting(compile=True, attention="eager", activation_checkpoint="full")
    cfg = load_config(ROOT / "configs" / "debug.toml", s.overrides())
    assert cfg.training.compile is True
    assert cfg.model.attention == "eager"
    assert cfg.parallel.activation_checkpoint == "full"
    assert cfg.training.micro_batch_size == 8


def test_speedup_over_cpu_matches_rows_by_setting() -> None:
    def row(stage: str, setting: Setting, tok_s: float) -> dict[str, Any]:
        return {
            "stage": stage,
            "setting": dataclasses.asdict(setting),
            "status": "ok",
            "tokens_per_s": tok_s,
        }

    base, eager = Setting(), Setting(attention="eager")
    cpu = {
        "rows": [row("baseline", base, 100.0), row("attention", eager, 50.0)],
        "best": row("best", base, 100.0),
    }
    gpu = [
        row("baseline", base, 1000.0),
        row("compile", Setting(compile=True), 2000.0),
        row("best", Setting(compile=True), 1900.0),
    ]
    out = mfu_report.speedup_over_cpu(gpu, cpu)
    assert [s["speedup"] for s in out["per_setting"]] == [10.0]
    assert out["best_over_best"] == 19.0
    assert mfu_report.rerun_ratio(gpu) == 0.95


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
        (["--stages", "tests,mfu"], "unknown stage 'mfu' in --stages"),
        ([], "needs a CUDA GPU: torch.cuda.is_available() is False"),
    ],
)
def test_run_gpu_refuses_bad_arguments_and_a_machine_without_cuda(
    args: list[str], message: str, tmp_path: Path
) -> None:
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
