"""data.streaming end to end: a jsonl corpus that was never prepared, tokenized while training;
stopped under torchrun (2 ranks) and resumed in one process, it trains on exactly the windows
an uninterrupted one-process run does (float32 losses at rtol 1e-5: FSDP sums in another order)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from distrib.data.sources import stdlib_files
from tests.support.runs import RESUMABLE_RUN, records, run_train, sample_records
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow


def test_a_stream_resumed_under_another_layout_sees_the_same_data(
    data_dir: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for path in stdlib_files(Path(sysconfig.get_paths()["stdlib"]))[:150]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    run = [
        *tiny_flags(),
        "--data.streaming=true",
        f"--data.source={corpus}",
        f"--data.tokenizer={data_dir / 'tokenizer.json'}",
        "--data.seq_len=64",
        *RESUMABLE_RUN,
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train(1, [*run, f"--job.run_dir={reference}"])
    run_train(
        2, [*run, f"--job.run_dir={resumed}", "--parallel.dp_shard=2", "--training.stop_at_step=4"]
    )
    assert "resumed from" in run_train(1, [*run, f"--job.run_dir={resumed}"])
    want = {r["step"]: r for r in records(reference)}
    got = {r["step"]: r for r in records(resumed)}
    assert sorted(got) == list(range(1, 9))
    for step, rec in want.items():
        assert got[step]["loss"] == pytest.approx(rec["loss"], rel=1e-5), step
    assert "val_loss" in want[4] and got[8]["val_loss"] == pytest.approx(
        want[8]["val_loss"], rel=1e-5
    )
    assert sample_records(resumed) == sample_records(reference)
    assert (resumed / "tokenizer.json").is_file()  # generate and export need it
