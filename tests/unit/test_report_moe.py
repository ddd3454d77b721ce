"""`distrib report`'s Mixture-of-Experts section, from hand-written metrics.jsonl rows."""

from __future__ import annotations

import json
from pathlib import Path

from distrib.commands.report import load_run, write_report
from distrib.commands.report_moe import moe_markdown, moe_summary


def _write(run: Path, rows: list[dict], config: dict | None = None) -> Path:
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps(config or {}))
    return run


def _moe_rows() -> list[dict]:
    """Four log steps of a model with two MoE layers after one dense block; step 3 lacks the
    max key (derived from the list), step 4 logged no MoE keys (a row from elsewhere)."""
    return [
        {"step": 1, "loss": 5.0, "moe_imbalance": [1.5, 1.2], "moe_imbalance_max": 1.5},
        {
            "step": 2,
            "loss": 4.5,
            "moe_imbalance": [2.5, 1.1],
            "moe_aux_loss": [1.2, 1.01],
            "moe_z_loss": [3.0, 2.0],
            "moe_imbalance_max": 2.5,
        },
        {
            "step": 3,
            "loss": 4.0,
            "moe_imbalance": [1.25, 1.4],
            "moe_aux_loss": [1.05, 1.02],
            "moe_z_loss": [2.5, 1.5],
        },
        {"step": 4, "loss": 3.9, "val_loss": 4.1},
    ]


def test_summary_takes_the_latest_layers_and_the_worst_layer_trend(tmp_path: Path) -> None:
    run = load_run(_write(tmp_path / "moe", _moe_rows(), {"model": {"moe_dense_layers": 1}}))
    s = moe_summary(run)
    assert s is not None
    assert (s.step, s.imbalance, s.aux_loss, s.z_loss) == (3, [1.25, 1.4], [1.05, 1.02], [2.5, 1.5])
    assert s.first_block == 1
    assert (s.trend_steps, s.trend) == ([1.0, 2.0, 3.0], [1.5, 2.5, 1.4])

    text = "\n".join(moe_markdown([run]))
    assert "## Mixture-of-Experts" in text
    assert "### moe: latest logged step 3" in text
    assert "| 0 (1) | 1.250 | 1.0500 | 2.5000 |" in text
    assert "| 1 (2) | 1.400 | 1.0200 | 1.5000 |" in text
    assert "1.500 at step 1 -> 1.400 at step 3; peak 2.500 at step 2 (3 logged steps)" in text


def test_missing_losses_show_na_and_bad_values_are_ignored(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 5.0, "moe_imbalance": [1.1, 1.3]},
        {"step": 2, "loss": 4.0, "moe_imbalance": [None, 1.0], "moe_imbalance_max": None},
    ]
    run = load_run(_write(tmp_path / "old", rows))
    s = moe_summary(run)
    assert s is not None and s.step == 1  # step 2's list holds a null: not a layer list
    assert (s.aux_loss, s.z_loss, s.first_block) == (None, None, 0)
    assert "| 1 (1) | 1.300 | n/a | n/a |" in "\n".join(moe_markdown([run]))


def test_report_adds_the_section_and_chart_only_for_moe_runs(tmp_path: Path) -> None:
    dense = _write(tmp_path / "dense", [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}])
    out = tmp_path / "dense-report"
    paths = write_report([dense], out)
    assert not (out / "moe_imbalance.png").exists()
    assert "Mixture-of-Experts" not in (out / "summary.md").read_text()
    assert moe_summary(load_run(dense)) is None

    moe = _write(tmp_path / "moe", _moe_rows())
    out = tmp_path / "both"
    paths = write_report([dense, moe], out)
    png = out / "moe_imbalance.png"
    assert png in paths and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    summary = (out / "summary.md").read_text()
    assert summary.index("## Mixture-of-Experts") < summary.index("## Charts")
    assert "### moe: latest logged step 3" in summary and "### dense" not in summary
    assert "![moe_imbalance](moe_imbalance.png)" in summary
