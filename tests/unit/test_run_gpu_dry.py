"""`bash bench/run_gpu.sh --dry-run` on this CPU: every stage of the GPU run (the GPU tests
collected and skipped, the debug preset, a CPU-sized stand-in of the 1b preset), the JSONs
written into --out, the verdicts printed, and nothing written into bench/results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mfu_report import TARGET_NAME

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_rehearses_every_stage(tmp_path: Path) -> None:
    results = ROOT / "bench" / "results"
    before = sorted(results.iterdir())
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "bench" / "run_gpu.sh"), "--dry-run", "--python", sys.executable]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=400, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(results.iterdir()) == before
    assert "skipped" in (out / "gpu-tests.log").read_text()
    (debug,) = out.glob("mfu-dryrun-cpu-*.json")
    (one_b,) = out.glob("mfu-1b-dryrun-cpu-*.json")
    for path in (debug, one_b):
        record = json.loads(path.read_text())
        assert record["dry_run"] and record["finished"]
        assert record["rows"] and record["best"]["status"] == "ok"
        assert record["data"].startswith("synthetic")  # no prepared data/stdlib needed
        timeouts = record["protocol"]["timeouts_s"]
        assert timeouts["compiled"] >= timeouts["eager"] + 120  # room for a cold compile
        assert record["protocol"]["deadline_s"] > 0
        assert all(Path(r["log"]).is_file() for r in record["rows"] if "log" in r)
    target = json.loads(one_b.read_text())["targets"][TARGET_NAME]
    # A CPU has no peak: with every planned row run the verdict is "unknown peak".
    assert target["applicable"]
    assert target["verdict"] == ("unknown peak" if target["complete"] else "incomplete")
    assert json.loads(debug.read_text())["targets"][TARGET_NAME]["verdict"] == "n/a"
    verdicts = (out / "verdicts.txt").read_text()
    assert f"{TARGET_NAME}: {target['verdict']}" in verdicts
    assert "mfu-dryrun-cpu-" in verdicts and "mfu-1b-dryrun-cpu-" in verdicts


def test_a_setting_cut_off_by_its_timeout_leaves_the_verdict_incomplete(tmp_path: Path) -> None:
    """A real worker killed at its timeout: a `timeout` row with the worker's output, no worker
    left running, and the 1b verdict `incomplete`, never PASS/FAIL."""
    tiny = ["--model.dim=64", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1"]
    tiny += ["--model.ffn_dim=64", "--model.vocab_size=128", "--data.seq_len=32"]
    cmd = [sys.executable, "-m", "bench.mfu", "--preset", "1b", "--dry-run", "--out", str(tmp_path)]
    cmd += ["--axes", "micro_batch_size", "--micro-batch-sizes", "8", "--setting-timeout", "1"]
    proc = subprocess.run(
        [*cmd, "--warmup", "1", "--steps", "1", *tiny],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("mfu-1b-dryrun-cpu-*.json")
    record = json.loads(path.read_text())
    assert [r["status"] for r in record["rows"]] == ["timeout"]
    assert record["rows"][0]["timeout_s"] == 1
    target = record["targets"][TARGET_NAME]
    assert (target["verdict"], target["pass"]) == ("incomplete", None)
    assert f"{TARGET_NAME}: incomplete" in proc.stdout
