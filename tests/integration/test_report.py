"""`distrib report`: charts and summary of real runs, and loading of hand-written metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.commands.report import load_run, series, summarize
from tests.support.runs import records

from .conftest import train

pytestmark = pytest.mark.slow

PNGS = [
    "loss_vs_step.png",
    "loss_vs_tokens.png",
    "lr.png",
    "throughput.png",
    "mfu.png",
    "memory.png",
    "step_time.png",
]


def _table(summary: str) -> dict[str, list[str]]:
    """Rows of the Markdown table in summary.md, keyed by run name."""
    rows = [line.strip("|").split(" | ") for line in summary.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def _check_pngs(out: Path) -> None:
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 5_000, name


def test_report_of_two_real_runs(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [tmp_path / "lr3e-3", tmp_path / "lr1e-3"]
    short = ["--training.steps=6", "--training.eval_every=3", "--checkpoint.interval=0"]
    assert train(data_dir, runs[0], *short) == 0
    assert train(data_dir, runs[1], *short, "--training.lr=1e-3", "--training.min_lr=1e-4") == 0
    capsys.readouterr()
    out = tmp_path / "report"

    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0

    _check_pngs(out)
    summary = (out / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    table = _table(summary)
    assert set(table) == {"lr3e-3", "lr1e-3"}
    for run in runs:
        recs = records(run)
        vals = [(r["val_loss"], r["step"]) for r in recs if r.get("val_loss") is not None]
        best, best_step = min(vals)
        # Documented: mean of the logged windows, without the first (warm-up) one.
        steady = [r["tokens_per_s"] for r in recs[1:]]
        row = table[run.name]
        assert row[1] == "6"
        assert row[2] == f"{recs[-1]['loss']:.4f}"
        assert row[3] == f"{vals[-1][0]:.4f}"
        assert row[4] == f"{best:.4f} (step {best_step})"
        assert row[5] == f"{sum(steady) / len(steady):,.0f}"
        assert row[6] == "n/a"  # no MFU on CPU
        assert row[7] == f"{recs[-1]['elapsed_s']:.1f} s"
        assert row[8:] == ["1 x 1 x 1 x 1 x 1", "float32"]


def _write_run(run: Path) -> None:
    """Three (re)starts: from scratch, again from scratch (resume=never), then resumed at 3."""
    lines = [
        {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 100.0, "elapsed_s": 1.0},
        {"step": 2, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 200.0, "elapsed_s": 2.0},
        {"step": 3, "loss": 3.8, "lr": 1e-3, "tokens_per_s": 210.0, "elapsed_s": 3.0},
        {"step": 1, "loss": 5.1, "lr": 1e-3, "tokens_per_s": 90.0, "elapsed_s": 0.5},
        {"step": 2, "loss": 4.1, "lr": 1e-3, "elapsed_s": 1.5, "val_loss": 4.4},
        {"step": 3, "loss": 3.9, "tokens_per_s": 80.0, "elapsed_s": 0.7, "mfu": None},
        {
            "step": 4,
            "loss": 3.5,
            "lr": 5e-4,
            "tokens_per_s": 220.0,
            "tokens_per_s_per_device": 55.0,
            "elapsed_s": 1.7,
            "val_loss": 4.2,
        },
    ]
    run.mkdir()
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "lo')  # cut short by a crash
    config = {
        "training": {"global_batch_size": 4, "dtype": "bfloat16"},
        "data": {"seq_len": 8},
        "parallel": {"dp_replicate": 1, "dp_shard": -1, "tp": 2, "pp": 1},
    }
    (run / "config.json").write_text(json.dumps(config))


def test_load_run_keeps_last_step_and_sums_restarts(tmp_path: Path) -> None:
    _write_run(tmp_path / "hand")
    run = load_run(tmp_path / "hand")
    assert run.name == "hand"
    assert [r["step"] for r in run.records] == [1, 2, 3, 4]
    assert [r["loss"] for r in run.records] == [5.1, 4.1, 3.9, 3.5]
    assert run.records[1]["val_loss"] == 4.4  # the last occurrence of step 2
    assert [r["tokens"] for r in run.records] == [32, 64, 96, 128]  # step x 4 x 8
    assert series(run.records, "step", "lr") == ([1.0, 2.0, 4.0], [1e-3, 1e-3, 5e-4])
    assert run.first_window_steps == {1, 3}
    assert run.wall_time_s == pytest.approx(3.0 + 1.5 + 1.7)

    s = summarize(run)
    assert s["steps"] == 4 and s["final_loss"] == 3.5 and s["final_val_loss"] == 4.2
    assert (s["best_val_loss"], s["best_val_step"]) == (4.2, 4)
    # Steps 1 and 3 open a (re)start; step 2 kept no tokens_per_s.
    assert s["tokens_per_s"] == pytest.approx(220.0)
    assert s["mfu"] is None
    assert s["layout"] == "1 x 2 x 1 x 2 x 1"  # dp_shard=-1 from 4 devices (220 / 55); cp 1
    assert s["dtype"] == "bfloat16"


def test_report_with_missing_keys_and_default_out(tmp_path: Path) -> None:
    _write_run(tmp_path / "hand")
    assert main(["report", str(tmp_path / "hand")]) == 0
    out = tmp_path / "hand" / "report"
    _check_pngs(out)  # mfu.png and step_time.png say "no data"
    row = _table((out / "summary.md").read_text())["hand"]
    assert row[1:8] == ["4", "3.5000", "4.2000", "4.2000 (step 4)", "220", "n/a", "6.2 s"]


def test_report_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert str(tmp_path / "empty" / "metrics.jsonl") in capsys.readouterr().err
