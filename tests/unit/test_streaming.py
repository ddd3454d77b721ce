"""The streaming loader on synthetic documents: which tokens each row gets (windows across
documents and epochs), the same global batches under every data-parallel degree, an exact
resume under another degree, the validation restart, and the config's checks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from distrib.config import load_config
from distrib.data.streaming import StreamingLoader
from distrib.errors import ConfigError, DataError

SEQ, G = 6, 8


class CharTokenizer:
    """One token per character (its code point), EOS 0."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


DOCS = [("abcdefghijklmnopqrstuvwxyz"[: 3 + (i * 7) % 19]) + str(i) for i in range(40)]


def _open(docs: list[str] = DOCS):
    def documents() -> Iterator[tuple[int, str]]:
        return iter(enumerate(docs))

    return documents


def _loader(dp: int = 1, rank: int = 0, docs: list[str] = DOCS) -> StreamingLoader:
    return StreamingLoader(_open(docs), CharTokenizer(), SEQ, G, 2, rank, dp)  # type: ignore[arg-type]


def _rows(loaders: list[StreamingLoader]) -> np.ndarray:
    """One global batch: every rank's rows, in rank order, as [G, SEQ + 1] (inputs + last label)."""
    rows = []
    for loader in loaders:
        for b in loader.next_step():
            rows.append(np.concatenate([b.inputs.numpy(), b.labels.numpy()[:, -1:]], axis=1))
    return np.concatenate(rows)


def _expected(row: int, step: int, docs: list[str] = DOCS) -> list[int]:
    """Window `step` (0-based) of row `row`, from its documents concatenated over epochs."""
    mine = [d for j, d in enumerate(docs) if j % G == row]
    stream: list[int] = []
    while len(stream) < (step + 1) * SEQ + 1:
        for d in mine:
            stream += [ord(c) for c in d] + [0]
    return stream[step * SEQ : step * SEQ + SEQ + 1]


def test_each_row_is_its_documents_cut_into_windows_across_epochs() -> None:
    loader = _loader()
    for step in range(30):  # row 0 has 5 documents of ~15 tokens: several epochs
        batch = _rows([loader])
        for row in range(G):
            assert batch[row].tolist() == _expected(row, step), (row, step)
    ids = loader.next_step()[0].sample_ids.tolist()
    assert ids == [30 * G, 30 * G + 1]  # window n of row i: n x G + i


def test_every_layout_gets_the_same_global_batches() -> None:
    single = _loader()
    layouts = [[_loader(dp, r) for r in range(dp)] for dp in (2, 4)]
    for _ in range(12):
        want = _rows([single])
        for ranks in layouts:
            assert np.array_equal(_rows(ranks), want)


def test_a_resume_under_another_degree_continues_exactly() -> None:
    reference = _loader()
    want = [_rows([reference]) for _ in range(14)]
    first = [_loader(2, r) for r in range(2)]
    got = [_rows(first) for _ in range(9)]
    # What the checkpoint holds: every rank's keys (a row's position is saved by its owner).
    state = {k: v for loader in first for k, v in loader.state_dict().items()}
    assert sum(k.startswith("row") for k in state) == G
    second = [_loader(4, r) for r in range(4)]
    for loader in second:
        mine = {
            k: v for k, v in state.items() if not k.startswith("row") or k in loader.state_dict()
        }
        loader.load_state_dict(mine)
    got += [_rows(second) for _ in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_reset_starts_the_stream_again() -> None:
    loader = _loader()
    first = [_rows([loader]) for _ in range(3)]
    loader.reset()
    assert all(np.array_equal(_rows([loader]), f) for f in first)


def test_a_source_with_fewer_documents_than_rows_is_refused() -> None:
    loader = _loader(docs=DOCS[:5])
    with pytest.raises(DataError, match="row 5 of the global batch gets no train document"):
        loader.next_step()


def test_streaming_config_checks() -> None:
    with pytest.raises(ConfigError, match="data.streaming needs data.tokenizer"):
        load_config(None, ["--data.streaming=true", "--data.source=x.jsonl"])
    with pytest.raises(ConfigError, match="not with data.format"):
        load_config(
            None,
            ["--data.streaming=true", "--data.tokenizer=t.json", "--data.format=chat"],
        )


def test_validation_is_one_stream_that_needs_few_documents() -> None:
    """Val cuts one stream into consecutive windows: three documents fill every row, and the
    batches are the same in every layout."""
    docs = DOCS[:3]

    def val(dp: int, rank: int) -> StreamingLoader:
        return StreamingLoader(_open(docs), CharTokenizer(), SEQ, G, 2, rank, dp, split="val")  # type: ignore[arg-type]

    stream: list[int] = []
    while len(stream) < 3 * G * SEQ + 1:
        for d in docs:
            stream += [ord(c) for c in d] + [0]
    one, four = val(1, 0), [val(4, r) for r in range(4)]
    for step in range(3):
        want = [stream[(step * G + i) * SEQ : (step * G + i) * SEQ + SEQ + 1] for i in range(G)]
        assert _rows([one]).tolist() == want
        assert _rows(four).tolist() == want
