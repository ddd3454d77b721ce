"""`distrib report`'s synchronization chart and table (loss vs step and vs bytes communicated),
and fault-tolerant run folders (`group<g>` subfolders), from hand-written run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.commands.report import load_runs, write_report
from distrib.commands.report_sync import bytes_levels, sync_curves, sync_label, sync_markdown

MB = 1_000_000
PNGS = {
    "loss_vs_step.png",
    "loss_vs_tokens.png",
    "lr.png",
    "throughput.png",
    "mfu.png",
    "memory.png",
    "step_time.png",
}


def _write(run: Path, rows: list[dict], config: dict) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps(config))
    return run


def _config(sync: str, every: int = 8, delay: int = 0) -> dict:
    return {
        "training": {
            "sync": sync,
            "sync_every": every,
            "sync_delay": delay,
            "global_batch_size": 4,
        },
        "data": {"seq_len": 8},
        "parallel": {"fault_tolerance": True, "dp_replicate": 2},
    }


def _ft_run(folder: Path, sync: str, per_step: int, every: int = 1, delay: int = 0) -> Path:
    """A fault-tolerant run folder: two groups, 8 steps; group 1's loss is 0.2 above group 0's,
    bytes go out every `every` steps (`per_step` x `every` each time); group 1 did not log
    step 8 (still running)."""
    config = _config(sync, every, delay)
    for g in (0, 1):
        rows = []
        for step in range(1, 9 - g):
            rows.append(
                {
                    "step": step,
                    "loss": 6.0 - 0.5 * step + 0.2 * g,
                    "sync_bytes": per_step * every * (step // every),
                    "replica_groups": 2,
                    "replica_group": g,
                    "elapsed_s": float(step),
                }
            )
        _write(folder / f"group{g}", rows, config)
    (folder / "lighthouse.log").write_text("")
    return folder


def _plain(run: Path) -> Path:
    rows = [{"step": s, "loss": 5.0 - s, "elapsed_s": float(s)} for s in (1, 2, 3)]
    return _write(run, rows, {"training": {"global_batch_size": 4}, "data": {"seq_len": 8}})


def test_groups_of_a_run_folder_are_runs_and_one_curve(tmp_path: Path) -> None:
    every = _ft_run(tmp_path / "every", "every_step", per_step=16 * MB)
    runs = load_runs(every)
    assert [r.name for r in runs] == ["every/group0", "every/group1"]
    assert [r.replica_of for r in runs] == ["every", "every"]
    assert [r.records[0]["tokens"] for r in runs] == [32, 32]  # from each group's config.json
    assert load_runs(_plain(tmp_path / "plain"))[0].replica_of is None

    [curve] = sync_curves(runs)
    assert (curve.name, curve.groups, curve.sync) == ("every", 2, "every_step")
    assert curve.steps == list(range(1, 8))  # step 8: only group 0 logged it
    assert curve.loss == pytest.approx([6.1 - 0.5 * s for s in range(1, 8)])  # the groups' mean
    assert curve.sync_bytes == [16 * MB * s for s in range(1, 8)]
    assert curve.bytes_per_step == 16 * MB
    assert curve.loss_at(3) == pytest.approx(4.6)
    assert curve.label == "every (every_step)"
    assert bytes_levels(curve) == list(zip(curve.sync_bytes, curve.loss, strict=True))

    diloco = _ft_run(tmp_path / "diloco", "diloco", per_step=MB, every=4, delay=2)
    [curve] = sync_curves(load_runs(diloco))
    assert curve.sync_bytes == [0, 0, 0, 4 * MB, 4 * MB, 4 * MB, 4 * MB]
    # One point per level above 0 bytes, at its last step: the loss before the next exchange.
    assert bytes_levels(curve) == [(4 * MB, pytest.approx(2.6))]
    assert (curve.sync_every, curve.sync_delay) == (4, 2)


def test_labels_name_the_sync_mode() -> None:
    assert sync_label("d", _config("diloco", 8, 4)) == "d (diloco, H=8, delay 4)"
    assert sync_label("l", _config("local_sgd", 8, 0)) == "l (local_sgd, H=8)"
    assert sync_label("x", {}) == "x"


def test_report_compares_sync_modes_and_keeps_plain_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every = _ft_run(tmp_path / "every", "every_step", per_step=16 * MB)
    diloco = _ft_run(tmp_path / "diloco", "diloco", per_step=2 * MB, every=4, delay=2)
    plain = _plain(tmp_path / "plain")
    out = tmp_path / "report"

    assert main(["report", str(every), str(diloco), str(plain), "--out", str(out)]) == 0

    assert {p.name for p in out.iterdir()} == PNGS | {"sync.png", "summary.md"}
    data = (out / "sync.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    summary = (out / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    # The main table: one row per replica group, and the plain run as before.
    for name in ("every/group0", "every/group1", "diloco/group0", "diloco/group1", "plain"):
        assert f"| {name} | " in summary
    assert "## Synchronization between replica groups" in summary
    # DiLoCo's groups exchanged at steps 4 (8 MB) and, group 0 alone, 8: to step 7, 8 MB.
    assert "| every | every_step | - | - | 2 | 7 | 2.6000 | 112.00 MB | 16.00 MB | 1.000 |" in (
        summary
    )
    assert "| diloco | diloco | 4 | 2 | 2 | 7 | 2.6000 | 8.00 MB | 1.14 MB | 0.071 |" in summary
    assert "| plain | " not in summary.split("## Synchronization")[1]
    assert "![sync](sync.png)" in summary


def test_runs_without_sync_bytes_get_no_sync_chart(tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report([_plain(tmp_path / "plain")], out)
    assert {p.name for p in paths} == PNGS | {"summary.md"}
    assert not (out / "sync.png").exists()
    assert "Synchronization" not in (out / "summary.md").read_text()


def test_same_folder_names_and_no_bytes_yet(tmp_path: Path) -> None:
    """Two fault-tolerant folders of one name keep their groups apart; a run that has not
    exchanged anything yet (sync_bytes 0 throughout) still gets its line and its row."""
    a = _ft_run(tmp_path / "a" / "run", "local_sgd", per_step=MB, every=16)
    b = _ft_run(tmp_path / "b" / "run", "every_step", per_step=MB)
    out = tmp_path / "report"
    write_report([a, b], out)
    summary = (out / "summary.md").read_text()
    assert "| a/run/group1 | " in summary and "| b/run/group0 | " in summary
    assert "| a/run | local_sgd | 16 | - | 2 | 7 | 2.6000 | 0 B | 0 B | 0.000 |" in summary
    assert "| b/run | every_step | - | - | 2 | 7 |" in summary
    assert (out / "sync.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_folder_without_metrics_or_groups_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ft" / "group0").mkdir(parents=True)  # a group that has logged nothing yet
    assert main(["report", str(tmp_path / "ft")]) == 2
    assert str(tmp_path / "ft" / "metrics.jsonl") in capsys.readouterr().err
    assert sync_markdown([]) == []
