"""bench.mfu's runner and report without a GPU: timeouts of compiled settings, the deadline,
the verdicts (incomplete, unknown peak, PASS/FAIL), the Hopper peaks, and the result JSON
written after every row."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import mfu, mfu_report, mfu_run
from bench.mfu_plan import Setting
from distrib.train.metrics import peak_tflops

EAGER, COMPILED = Setting(), Setting(compile=True)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def limits(clock: Clock, **kw: Any) -> mfu_run.Limits:
    return mfu_run.Limits(
        **{"setting_timeout": 90, "compile_timeout": 240, **kw}, start=0.0, clock=clock
    )


def test_compiled_settings_get_a_cold_compile_timeout() -> None:
    args, _ = mfu.parse_args(["--setting-timeout", "60"])
    assert args.compile_timeout == 60 + mfu_run.COLD_COMPILE_S
    args, _ = mfu.parse_args(["--setting-timeout", "60", "--compile-timeout", "500"])
    assert args.compile_timeout == 500
    lim = limits(Clock())
    assert lim.timeout(EAGER) == 90 and lim.timeout(COMPILED) == 240


def test_the_deadline_cuts_timeouts_and_stops_settings_that_cannot_finish() -> None:
    clock = Clock()
    lim = limits(clock, deadline_s=300)
    assert lim.timeout(COMPILED) == 240 and lim.refusal(COMPILED, []) is None
    clock.t = 150  # 145 s left before the margin: the compiled timeout is cut to it
    assert lim.timeout(COMPILED) == pytest.approx(300 - 150 - mfu_run.DEADLINE_MARGIN_S)
    # A compiled setting took 160 s before: with 145 s left another is not started; eager is.
    took = [{"status": "ok", "setting": dataclasses.asdict(COMPILED), "process_s": 160.0}]
    assert "compiled setting needs ~160 s" in lim.refusal(COMPILED, took)
    assert lim.refusal(EAGER, took) is None
    clock.t = 300 - mfu_run.DEADLINE_MARGIN_S - mfu_run.MIN_START_S + 1
    assert "--deadline-s 300" in lim.refusal(EAGER, [])


def test_the_budget_stops_starting_settings() -> None:
    clock = Clock()
    lim = limits(clock, budget_s=100)
    assert lim.refusal(EAGER, []) is None
    clock.t = 101
    assert lim.refusal(COMPILED, []) == "--budget-s 100 spent"


def row(stage: str, status: str = "ok", mfu: float | None = 0.6, peak: float | None = 989.0):
    out: dict[str, Any] = {"stage": stage, "setting": dataclasses.asdict(COMPILED)}
    out["status"] = status
    if status == "ok":
        out |= {"tokens_per_s": 1000.0, "mfu": mfu, "peak_tflops": peak}
    return out


def verdict(rows: list[dict[str, Any]], finished: bool = True, cuda: bool = True) -> dict:
    t = mfu_report.target("1b", cuda, "NVIDIA H100 80GB HBM3", rows, finished)
    return t[mfu_report.TARGET_NAME]


def test_verdicts() -> None:
    assert verdict([row("likely_best"), row("best")])["verdict"] == "PASS"
    assert verdict([row("likely_best", mfu=0.5)])["pass"] is False
    assert verdict([row("likely_best", "oom"), row("baseline", mfu=0.3)])["verdict"] == "FAIL"
    assert verdict([row("likely_best")], cuda=False)["verdict"] == "n/a"
    assert mfu_report.target("debug", True, "x", [row("best")], True)[mfu_report.TARGET_NAME][
        "verdict"
    ] == ("n/a")


@pytest.mark.parametrize("status", ["not_run", "timeout"])
def test_a_plan_cut_short_is_incomplete_even_above_the_target(status: str) -> None:
    t = verdict([row("likely_best", mfu=0.7), row("compile", status)])
    assert (t["verdict"], t["pass"], t["complete"], t["rows_not_measured"]) == (
        "incomplete",
        None,
        False,
        1,
    )
    assert "incomplete (best MFU so far 70.0%" in mfu_report.verdict_line("target", t)
    # A JSON written midway (the walk not finished) is incomplete too.
    assert verdict([row("likely_best", mfu=0.7)], finished=False)["verdict"] == "incomplete"


def test_an_unknown_gpu_is_unknown_peak_not_fail() -> None:
    t = verdict([row("likely_best", mfu=None, peak=None)])
    assert (t["verdict"], t["pass"]) == ("unknown peak", None)
    assert "--metrics.peak_tflops" in t["note"]


@pytest.mark.parametrize(
    ("name", "bf16", "tf32"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, 494.0),
        ("NVIDIA H100 NVL", 835.0, 417.0),
        ("NVIDIA H100 PCIe", 756.0, 378.0),
        ("NVIDIA H200", 989.0, 494.0),
        ("NVIDIA H200 NVL", 835.0, 417.0),
        ("NVIDIA GH200 480GB", 989.0, 494.0),
        ("Some Future GPU", None, None),
    ],
)
def test_hopper_peaks(monkeypatch: pytest.MonkeyPatch, name: str, bf16: Any, tf32: Any) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert peak_tflops(cuda, "bfloat16") == bf16
    assert peak_tflops(cuda, "float32") == tf32


def test_the_json_is_written_after_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row lands in the --out JSON before the next setting starts; until the walk ends
    the file says `finished: false` and the verdict `incomplete`."""
    out = tmp_path / "out"
    seen: list[dict[str, Any]] = []

    def fake(worker_args: list[str], lim: Any, tmp: Path, logs: Any) -> Any:
        def measure(setting: Setting, stage: str) -> dict[str, Any]:
            files = list(out.glob("mfu-1b-*.json"))
            seen.append(json.loads(files[0].read_text()) if files else {})
            head = {"stage": stage, "setting": dataclasses.asdict(setting)}
            return head | {"setting_obj": setting} | row(stage, mfu=0.6)

        return measure

    monkeypatch.setattr(mfu, "measure_in_subprocess", fake)
    tiny = ["--model.dim=64", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1"]
    tiny += ["--model.ffn_dim=64", "--model.vocab_size=128", "--data.seq_len=32"]
    argv = ["--preset", "1b", "--dry-run", "--out", str(out), "--axes", "micro_batch_size"]
    assert mfu.main([*argv, "--warmup", "1", "--steps", "1", *tiny]) == 0
    assert seen[0] == {}  # nothing measured before the first setting
    counts = [len(s["rows"]) for s in seen[1:]]
    assert counts == sorted(counts) and counts[0] >= 1
    for s in seen[1:]:
        assert s["finished"] is False
        assert s["targets"][mfu_report.TARGET_NAME]["verdict"] == "incomplete"
    (final,) = out.glob("mfu-1b-dryrun-cpu-*.json")
    record = json.loads(final.read_text())
    assert record["finished"] and record["dry_run"]
    assert len(record["rows"]) == len(seen)
    assert record["targets"][mfu_report.TARGET_NAME]["verdict"] == "PASS"
    assert record["protocol"]["timeouts_s"]["compiled"] > record["protocol"]["timeouts_s"]["eager"]


def test_a_dry_run_writes_nothing_into_bench_results(tmp_path: Path) -> None:
    args, _ = mfu.parse_args(["--dry-run", "--out", str(tmp_path)])
    env = {"device": "cpu", "device_name": "x86_64"}
    (path,) = mfu.result_paths(args, env)
    assert path.parent == tmp_path and path.name.startswith("mfu-dryrun-cpu-")
    args, _ = mfu.parse_args([])
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H100 NVL"}
    (path,) = mfu.result_paths(args, gpu)
    assert path.parent == mfu.RESULTS_DIR and path.name.startswith("mfu-nvidia-h100-nvl-")
