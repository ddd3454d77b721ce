"""The test suite's own helpers (tests/support): the tiny model's config and flags agree, and the
metrics reader copes with a run that is still writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrib.config import load_config
from tests.support.runs import records
from tests.support.tiny import TINY, tiny_config, tiny_flags


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_layers": 2, "tie_embeddings": True, "attention": "eager", "rope_theta": 500.0}],
    ids=["shape", "overridden"],
)
def test_flags_parse_to_the_config(overrides: dict) -> None:
    seq_len = f"--data.seq_len={TINY['max_seq_len']}"
    cfg = load_config(None, [*tiny_flags(**overrides), seq_len])
    assert cfg.model == tiny_config(**overrides)
    fields = {**TINY, **overrides}
    assert {key: getattr(cfg.model, key) for key in fields} == fields


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="dimm"):
        tiny_config(dimm=3)
    with pytest.raises(TypeError, match="dimm"):
        tiny_flags(dimm=3)


def test_records_reads_whole_lines_only(tmp_path: Path) -> None:
    assert records(tmp_path) == []  # nothing logged yet
    whole = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": None}]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 3, "lo')  # a line being written
    assert records(tmp_path) == whole
