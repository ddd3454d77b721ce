"""prepare_dataset end to end: a tiny local corpus, a user tokenizer, atomicity, the stdlib."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

import distrib.data.prepare as prepare_module
from distrib.config import DataConfig
from distrib.data import Tokenizer, TokenLoader, TokenShards, iter_documents, prepare_dataset
from distrib.errors import DataError


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf")))


@pytest.fixture
def corpus(tmp_path) -> DataConfig:
    docs = [
        f"def f{i}(x):\n\tif x > {i}:\n\t\treturn 'héllo {i}'\n    return None  # 🐍\n"
        for i in range(60)
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return DataConfig(source=str(path), dir=str(tmp_path / "prepared"), val_fraction=0.1)


def _decoded_docs(dir, split) -> list[str]:
    shards = TokenShards.open(dir, split)
    tok = Tokenizer.load(dir / "tokenizer.json")
    stream = shards.window(0, shards.num_tokens).tolist()
    return tok.decode(stream).split("<|endoftext|>")[:-1]


def test_prepare_tiny_corpus(corpus):
    lines: list[str] = []
    dir = prepare_dataset(corpus, vocab_size=300, seed=0, log=lines.append)
    assert dir.name == "prepared" and len(lines) == 2 and "vocab 300" in lines[-1]
    manifest = json.loads((dir / "manifest.json").read_text())
    assert manifest["vocab_size"] == 300 and manifest["dtype"] == "uint16"
    assert manifest["data_config"]["source"] == corpus.source and manifest["seed"] == 0
    assert "60 documents" in manifest["source"]
    train, val = list(iter_documents(corpus, "train")), list(iter_documents(corpus, "val"))
    assert manifest["splits"]["train"]["num_documents"] == len(train)
    assert manifest["splits"]["val"]["num_documents"] == len(val) >= 1
    # val keeps corpus order; train is shuffled but holds the same documents, all exact
    assert _decoded_docs(dir, "val") == val
    decoded_train = _decoded_docs(dir, "train")
    assert sorted(decoded_train) == sorted(train) and decoded_train != train
    TokenShards.open(dir, "train").verify()
    assert sorted(p.name for p in dir.parent.iterdir()) == ["corpus.jsonl", "prepared"]


def test_prepare_is_deterministic(corpus, tmp_path):
    a = prepare_dataset(corpus, 300, seed=1, log=lambda _: None)
    first = json.loads((a / "manifest.json").read_text())
    prepare_dataset(corpus, 300, seed=1, log=lambda _: None)  # replaces the folder in place
    assert json.loads((a / "manifest.json").read_text()) == first


def test_prepare_with_given_tokenizer(corpus, tmp_path):
    trained = prepare_dataset(corpus, 300, seed=0, log=lambda _: None)
    given = DataConfig(**{**vars(corpus), "tokenizer": str(trained), "dir": str(tmp_path / "b")})
    prepare_dataset(given, 300, seed=0, log=lambda _: None)
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (
        trained / "tokenizer.json"
    ).read_text()
    with pytest.raises(DataError, match="has 300 tokens, more than model.vocab_size = 299"):
        prepare_dataset(given, 299, seed=0, log=lambda _: None)


def test_failed_prepare_keeps_old_dataset(corpus, monkeypatch):
    dir = prepare_dataset(corpus, 300, seed=0, log=lambda _: None)
    before = (dir / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "write_split", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(corpus, 300, seed=5, log=lambda _: None)
    assert (dir / "manifest.json").read_text() == before
    # The parts folder stays, for the next run to resume from (its tokenizer is saved).
    (parts,) = dir.parent.glob("prepared.parts-*")
    assert sorted(p.name for p in parts.iterdir()) == ["tokenizer.json"]
    assert sorted(p.name for p in dir.parent.iterdir()) == ["corpus.jsonl", "prepared", parts.name]


def test_prepare_default_corpus_subset(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "stdlib"), max_documents=40, val_fraction=0.1)
    dir = prepare_dataset(cfg, vocab_size=512, seed=0, log=lambda _: None)
    manifest = json.loads((dir / "manifest.json").read_text())
    assert "stdlib" in manifest["source"] and manifest["vocab_size"] == 512
    docs = manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"]
    assert docs <= 40 and manifest["splits"]["val"]["num_documents"] >= 1
    assert _decoded_docs(dir, "val") == list(iter_documents(cfg, "val"))
    loader = TokenLoader(TokenShards.open(dir, "train"), 64, 4, 2, 0, 1, seed=0)
    batch = loader.next_step()[0]
    assert batch.inputs.shape == (2, 64) and int(batch.inputs.max()) < 512
    assert np.all(batch.labels[:, :-1].numpy() == batch.inputs[:, 1:].numpy())


def test_prepare_reuses_an_up_to_date_dataset(tmp_path: Path) -> None:
    from distrib.data.prepare import is_up_to_date

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document {i} says hello world " * 20)
    cfg = DataConfig(source=str(corpus), dir=str(tmp_path / "ds"), val_fraction=0.3)
    assert not is_up_to_date(cfg, 300, 0)
    messages: list[str] = []
    out = prepare_dataset(cfg, 300, 0, log=messages.append)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert is_up_to_date(cfg, 300, 0)
    prepare_dataset(cfg, 300, 0, log=messages.append)
    assert "up to date" in messages[-1]
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    cfg.seq_len = 32  # read by the loader only: the shards still fit
    assert is_up_to_date(cfg, 300, 0)
    assert not is_up_to_date(cfg, 320, 0) and not is_up_to_date(cfg, 300, 1)
    prepare_dataset(cfg, 300, 0, log=messages.append, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
