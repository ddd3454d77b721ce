"""A weighted mixture end to end: `distrib prepare` with two sources sharing one tokenizer, then
training under torchrun (2 ranks) stopped and resumed in one process, against an uninterrupted
one-process run: the same losses (float32, rtol 1e-5: FSDP sums gradients in another order),
every sample drawn once, per-source validation and shares in metrics.jsonl and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distrib.cli import main
from tests.support.runs import RESUMABLE_RUN, records, run_train, sample_records
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow

MIXTURE = """
[data]
dir = "{dir}"
seq_len = 64
max_documents = 120
val_fraction = 0.1
[[data.sources]]
name = "code"
weight = 0.75
[[data.sources]]
name = "docs"
source = "builtin:python-docs"
weight = 0.25
[[data.weight_schedule]]
step = 5
weights = {{ code = 0.5, docs = 0.5 }}
[model]
vocab_size = 512
"""
RUN = [*tiny_flags(), *RESUMABLE_RUN]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixture's config file, prepared."""
    folder = tmp_path_factory.mktemp("mixture")
    config = folder / "mixture.toml"
    config.write_text(MIXTURE.format(dir=folder / "data"))
    assert main(["prepare", "--config", str(config)]) == 0
    return config


def test_prepare_shares_one_tokenizer_and_skips_what_did_not_change(
    mixture: Path, capsys: pytest.CaptureFixture
) -> None:
    data = mixture.parent / "data"
    doc = json.loads((data / "mixture.json").read_text())
    assert sorted(doc["sources"]) == ["code", "docs"]
    shared = (data / "tokenizer.json").read_bytes()
    for name in ("code", "docs"):
        assert (data / "sources" / name / "tokenizer.json").read_bytes() == shared
    capsys.readouterr()
    # New weights are the loader's business: nothing is prepared again.
    other = mixture.parent / "reweighted.toml"
    other.write_text(mixture.read_text().replace("weight = 0.75", "weight = 0.5"))
    assert main(["prepare", "--config", str(other)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert main(["prepare", "--config", str(mixture), "--verify"]) == 0
    assert capsys.readouterr().out.count("every sha256 matches") == 2


def test_a_mixture_trains_resumes_under_another_layout_and_reports(
    mixture: Path, tmp_path: Path
) -> None:
    config = ["--config", str(mixture)]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_train(1, [*config, *RUN, f"--job.run_dir={reference}"])
    run_train(
        2,
        [
            *config,
            *RUN,
            f"--job.run_dir={resumed}",
            "--parallel.dp_shard=2",
            "--training.stop_at_step=4",
        ],
    )
    out = run_train(1, [*config, *RUN, f"--job.run_dir={resumed}"])
    assert "resumed from" in out
    want = {r["step"]: r for r in records(reference)}
    got = {r["step"]: r for r in records(resumed)}
    assert sorted(got) == list(range(1, 9))
    for step, rec in want.items():
        assert got[step]["loss"] == pytest.approx(rec["loss"], rel=1e-5), step
        for key in ("data_share/code", "data_share/docs"):
            assert got[step][key] == rec[key]
    # Steps 1-4 at 3:1 (24 code, 8 docs), steps 5-8 half and half (16 and 16).
    assert want[4]["data_share/docs"] == 8 / 32 and want[8]["data_share/docs"] == 24 / 64
    assert want[8]["data_weight/docs"] == 0.5
    for step in (4, 8):
        val = want[step]
        assert {"val_loss/code", "val_loss/docs", "val_ppl/code", "val_ppl/docs"} <= set(val)
        assert val["val_ppl/docs"] == pytest.approx(math.exp(val["val_loss/docs"]))
        weighted = 0.75 * val["val_loss/code"] + 0.25 * val["val_loss/docs"]
        assert val["val_loss"] == pytest.approx(weighted, rel=1e-6)  # the first weights
    # Exactly once: the same samples, step by step, as the one-process run, none twice.
    ids = sample_records(resumed)
    assert ids == sample_records(reference)
    flat = [i for step in ids.values() for i in step]
    assert len(flat) == len(set(flat)) == 64
    assert main(["report", str(resumed)]) == 0
    summary = (resumed / "report" / "summary.md").read_text()
    assert "## Data mixture" in summary and "| resumed | docs |" in summary
    assert (resumed / "report" / "val_loss_by_source.png").is_file()
