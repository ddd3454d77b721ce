"""Preparation in parts: worker processes, a corpus split over tasks and merged, and an
interrupted preparation resumed all give the dataset one process writes, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

import distrib.data.prepare as prepare_module
import distrib.data.prepare_parts as parts_module
from distrib.config import DataConfig
from distrib.data import prepare_dataset
from distrib.errors import DataError

pytestmark = pytest.mark.slow  # worker processes start in a few seconds each


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf")))
    monkeypatch.setattr(parts_module, "MIN_PART_DOCUMENTS", 16)  # ~20 parts, not 1
    monkeypatch.setattr(parts_module, "PARALLEL_MIN_DOCUMENTS", 0)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    docs = [
        f"def f{i}(x):\n    return x * {i} + {i % 7}  # note {i}\n" * (1 + i % 5)
        for i in range(330)
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _cfg(corpus: Path, out: Path, num_proc: int = 1) -> DataConfig:
    return DataConfig(source=str(corpus), dir=str(out), val_fraction=0.1, num_proc=num_proc)


def _fingerprint(dir: Path) -> tuple:
    manifest = json.loads((dir / "manifest.json").read_text())
    shards = {
        s: [(r["file"], r["sha256"]) for r in v["shards"]] for s, v in manifest["splits"].items()
    }
    return shards, (dir / "tokenizer.json").read_bytes()


def _quiet(_: str) -> None:
    pass


def test_processes_and_tasks_write_what_one_process_writes(corpus: Path, tmp_path: Path) -> None:
    one = prepare_dataset(_cfg(corpus, tmp_path / "one"), 300, 0, _quiet, max_shard_tokens=5000)
    want = _fingerprint(one)
    assert len(want[0]["train"]) > 1  # several shards, whose boundaries must match too
    two = prepare_dataset(
        _cfg(corpus, tmp_path / "two", num_proc=2), 300, 0, _quiet, max_shard_tokens=5000
    )
    assert _fingerprint(two) == want
    assert not list(tmp_path.glob("two.parts-*"))  # removed once the dataset is in place

    split = _cfg(corpus, tmp_path / "split")
    with pytest.raises(DataError, match="--tokenizer-only"):
        prepare_dataset(split, 300, 0, _quiet, task=(1, 2))
    prepare_dataset(split, 300, 0, _quiet, tokenizer_only=True)
    lines: list[str] = []
    for task in (1, 0):  # in any order, on any machine sharing the folder
        prepare_dataset(split, 300, 0, lines.append, task=(task, 2))
    assert "task 1 of 2" in lines[1] and not (tmp_path / "split").exists()
    merged = prepare_dataset(split, 300, 0, lines.append, max_shard_tokens=5000)
    assert any(line.startswith("resuming: ") for line in lines)
    assert _fingerprint(merged) == want


def test_an_interrupted_preparation_resumes_where_it_stopped(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _fingerprint(prepare_dataset(_cfg(corpus, tmp_path / "clean"), 300, 0, _quiet))
    real = prepare_module.write_split
    written: list[int] = []

    def dies_at_the_eighth_part(*args: object, **kwargs: object) -> None:
        if len(written) == 7:
            raise KeyboardInterrupt
        real(*args, **kwargs)
        written.append(1)

    cfg = _cfg(corpus, tmp_path / "ds")
    monkeypatch.setattr(prepare_module, "write_split", dies_at_the_eighth_part)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, 300, 0, _quiet)
    assert not (tmp_path / "ds").exists()  # nothing that looks like a dataset
    (folder,) = tmp_path.glob("ds.parts-*")
    # A kill between renaming a part's file and writing its record: the part is not done.
    last = sorted(folder.glob("train-*.json"))[-1]
    last.unlink()
    monkeypatch.setattr(prepare_module, "write_split", real)
    lines: list[str] = []
    dir = prepare_dataset(cfg, 300, 0, lines.append)
    assert any("resuming: 6 of" in line for line in lines), lines
    assert _fingerprint(dir) == want


def test_the_command_line_checks_task_flags(capsys: pytest.CaptureFixture) -> None:
    from distrib.cli import main

    for flags in (["--task", "1"], ["--task", "2", "--tasks", "2"], ["--tasks", "2"]):
        assert main(["prepare", *flags]) == 2
        assert "give both, with 0 <= TASK < TASKS" in capsys.readouterr().err
    assert main(["prepare", "--task", "0", "--tasks", "2", "--tokenizer-only"]) == 2
    assert "does not go with" in capsys.readouterr().err
