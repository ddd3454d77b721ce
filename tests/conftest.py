"""Fixtures shared by the integration and distributed tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib.cli import main
from tests.support.tiny import TINY

# A small slice of the standard library, tokenized once per test session into as many tokens as
# the tiny model's vocabulary.
DATA = ["--data.max_documents=120", f"--model.vocab_size={TINY['vocab_size']}", "--data.seq_len=64"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default corpus (first documents only), prepared through the CLI."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    assert main(["prepare", f"--data.dir={out}", *DATA]) == 0
    return out
