"""Checkpoints written before the package restructure still resume, on both engines.

`tests/data/checkpoint-v0/` holds step-4 checkpoints that distrib wrote at commit f616276 (see its
README.json for the exact flags): DCP files from the native engine and DeepSpeed's own files
from a ZeRO-1 run. Each is resumed here to step 8; where this machine prepares the same corpus
(the training shard's hash matches), the losses of steps 5-8 must equal those of the original
uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distrib.cli import main
from distrib.data import sources
from tests.conftest import DATA
from tests.support.runs import records

LEGACY = Path(__file__).parents[1] / "data" / "checkpoint-v0"
README = json.loads((LEGACY / "README.json").read_text())


@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus those checkpoints trained on: the first documents of the standard library
    before generated tables were left out (the loader refuses a dataset of another size)."""
    out = tmp_path_factory.mktemp("legacy-data") / "stdlib"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "TABLE_MIN_BYTES", float("inf"))
        assert main(["prepare", f"--data.dir={out}", *DATA]) == 0
    return out


def _same_corpus(data_dir: Path) -> bool:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return manifest["splits"]["train"]["shards"][0]["sha256"] == README["data_train_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "flags"),
    [
        ("native", []),
        ("deepspeed", ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"]),
    ],
)
def test_checkpoint_from_before_the_restructure_resumes(
    legacy_data: Path, tmp_path: Path, engine: str, flags: list[str], capsys, monkeypatch
) -> None:
    # DeepSpeed sets RANK / LOCAL_RANK / WORLD_SIZE in os.environ; undo that after the test,
    # or later in-process runs would take themselves for a torchrun launch.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copytree(LEGACY / f"{engine}-step-00000004", folder / "step-00000004")
    argv = ["train", f"--data.dir={legacy_data}", f"--job.run_dir={tmp_path}", *README["flags"]]
    assert main([*argv, *flags]) == 0
    assert "resumed from" in capsys.readouterr().out
    recs = {r["step"]: r for r in records(tmp_path) if "loss" in r}
    assert sorted(recs) == [5, 6, 7, 8]
    if _same_corpus(legacy_data):
        got = [recs[s]["loss"] for s in (5, 6, 7, 8)]
        assert got == pytest.approx(README["continuous_losses_steps_5_to_8"], rel=1e-5)
