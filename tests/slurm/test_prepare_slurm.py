"""`slurm/prepare.sbatch` on the local cluster (conftest.py): the tokenizer job, a two-task array
and the merge job, chained by dependencies, make the dataset one process makes, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrib.cli import main
from tests.slurm.conftest import REPO, Cluster
from tests.slurm.test_slurm import assert_completed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "prepare.sbatch"


def _shards(dir: Path) -> list[str]:
    manifest = json.loads((dir / "manifest.json").read_text())
    return [r["sha256"] for split in manifest["splits"].values() for r in split["shards"]]


def test_a_corpus_tokenized_by_a_job_array_and_merged(
    slurm_cluster: Cluster, tmp_path: Path
) -> None:
    docs = [f"def g{i}(y):\n    return y - {i}  # {i % 11}\n" * (1 + i % 4) for i in range(400)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = tmp_path / "prepare.toml"
    config.write_text(
        f'[data]\nsource = "{corpus}"\ndir = "ds"\nval_fraction = 0.1\n[model]\nvocab_size = 300\n'
    )
    first = slurm_cluster.sbatch([str(SCRIPT), str(config), "--tokenizer-only"], tmp_path)
    array = slurm_cluster.sbatch(
        [f"--dependency=afterok:{first}", "--array=0-1", str(SCRIPT), str(config)], tmp_path
    )
    merge = slurm_cluster.sbatch(
        [f"--dependency=afterok:{array}", str(SCRIPT), str(config)], tmp_path
    )
    for job in (first, merge):
        assert_completed(slurm_cluster.wait(job), tmp_path, job, slurm_cluster)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-prepare-*.out")))
    assert "task 0 of 2" in logs and "task 1 of 2" in logs, logs[-3000:]
    assert "resuming: " in logs  # the merge found every part done by the array
    assert main(["prepare", "--config", str(config), f"--data.dir={tmp_path / 'one'}"]) == 0
    assert _shards(tmp_path / "ds") == _shards(tmp_path / "one")
    assert not list(tmp_path.glob("ds.parts-*"))
