"""training.loss_chunk_tokens through the trainer: the chunked output head + loss trains like
the whole-logits one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import records

from .conftest import train

pytestmark = pytest.mark.slow


def test_chunked_loss_trains_like_the_plain_loss(data_dir: Path, tmp_path: Path) -> None:
    """Micro-batches of 4 x 64 = 256 tokens in chunks of 100 (the last one 56): the same losses,
    gradient norms and validation losses, up to float32 summation order."""
    plain, chunked = tmp_path / "plain", tmp_path / "chunked"
    assert train(data_dir, plain, "--training.steps=4") == 0
    assert train(data_dir, chunked, "--training.steps=4", "--training.loss_chunk_tokens=100") == 0
    got, want = records(chunked), records(plain)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    val = [r["val_loss"] for r in got if "val_loss" in r]
    assert val and val == pytest.approx([r["val_loss"] for r in want if "val_loss" in r], rel=1e-5)
