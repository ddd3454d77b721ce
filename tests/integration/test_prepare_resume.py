"""`distrib prepare` killed (SIGKILL) half-way through tokenizing: no dataset appears, and the
next run resumes from the parts already written and makes the dataset an uninterrupted run
makes, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrib.cli import main
from tests.support.runs import ROOT, child_env

pytestmark = pytest.mark.slow


def _shards(dir: Path) -> list[str]:
    manifest = json.loads((dir / "manifest.json").read_text())
    return [r["sha256"] for split in manifest["splits"].values() for r in split["shards"]]


def test_a_killed_preparation_resumes(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(30000):  # ~18 MB: a few seconds of tokenizing, in ~450 parts
            f.write(
                json.dumps({"text": f"def f{i}(x):\n    return x + {i}  # {i % 97}\n" * 20}) + "\n"
            )
    flags = [
        f"--data.source={corpus}",
        f"--data.tokenizer={data_dir / 'tokenizer.json'}",  # no BPE training: straight to the parts
        "--model.vocab_size=512",
        "--data.num_proc=1",
    ]
    assert main(["prepare", *flags, f"--data.dir={tmp_path / 'clean'}"]) == 0
    killed = subprocess.Popen(
        [sys.executable, "-m", "distrib.cli", "prepare", *flags, f"--data.dir={tmp_path / 'ds'}"],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("ds.parts-*/train-*.json")):
        assert killed.poll() is None, "the preparation ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "ds" / "manifest.json").exists()  # nothing looks complete
    capsys.readouterr()
    assert main(["prepare", *flags, f"--data.dir={tmp_path / 'ds'}"]) == 0
    out = capsys.readouterr().out
    assert "resuming: " in out, out
    assert _shards(tmp_path / "ds") == _shards(tmp_path / "clean")
    assert not list(tmp_path.glob("ds.parts-*"))
