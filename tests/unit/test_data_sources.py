"""Corpus reading: the default stdlib corpus, local files through HF datasets, bad-data errors."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distrib.config import DataConfig
from distrib.data.sources import (
    iter_documents,
    load_corpus,
    looks_like_hub_name,
    split_by_key,
    stable_fraction,
    stdlib_files,
)
from distrib.errors import DataError


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    # Keep HF's arrow cache out of the shared home folder (and out of the corpus folders).
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


def _docs(cfg: DataConfig) -> tuple[list[str], list[str]]:
    return list(iter_documents(cfg, "train")), list(iter_documents(cfg, "val"))


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---- the default corpus -------------------------------------------------------------------------


def test_stdlib_files_exclude_tests_and_site_packages():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
    assert len(rel) > 300 and "json/decoder.py" in rel and "os.py" in rel
    for path in rel:
        parts = path.split("/")[:-1]
        assert not any(p.startswith("test") for p in parts), path
        assert (
            "site-packages" not in parts and "__pycache__" not in parts and "idle_test" not in parts
        )
    assert rel == sorted(rel)


def test_stable_hash_is_machine_independent():
    # sha256-based, so these are the same on every machine and Python version.
    assert stable_fraction("os.py") == pytest.approx(0.850948727781281)
    assert stable_fraction("json/decoder.py") == pytest.approx(0.23117427244379962)


def test_default_corpus_split_by_file_is_deterministic():
    cfg = DataConfig(max_documents=60, val_fraction=0.1)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.train_ids.tolist() == b.train_ids.tolist()
    assert a.val_ids.tolist() == b.val_ids.tolist()
    assert len(a.val_ids) >= 1 and len(a.train_ids) >= 1
    assert set(a.train_ids.tolist()).isdisjoint(a.val_ids.tolist())
    assert "stdlib" in a.description
    train, val = _docs(cfg)
    assert train and val and all(d.strip() for d in train + val)


def test_val_never_empty():
    train, val = split_by_key(["a", "b", "c"], val_fraction=1e-9)
    assert len(val) == 1 and len(train) == 2
    train, val = split_by_key(["a", "b"], val_fraction=0.999999)
    assert len(val) == 1 and len(train) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_by_key(["a"], 0.5)


# ---- local files through HF datasets ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample_by", "expected"), [("document", 2), ("paragraph", 2), ("line", 3)]
)
def test_txt_files(tmp_path, sample_by, expected):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four\n\nfive\nsix\n", encoding="utf-8")
    # A folder of two files for whole-file documents, one file split into paragraphs or lines.
    source = tmp_path if sample_by == "document" else tmp_path / "a.txt"
    cfg = DataConfig(source=str(source), text_sample_by=sample_by, val_fraction=0.3)
    train, val = _docs(cfg)
    assert len(train) + len(val) == expected and train and val
    joined = "".join(train + val)
    assert "one" in joined and "three" in joined


def test_jsonl_and_json_array(tmp_path):
    records = [{"text": f"doc {i}", "id": i} for i in range(20)] + [{"text": "  "}]
    _write_jsonl(tmp_path / "a.jsonl", records)
    train, val = _docs(DataConfig(source=str(tmp_path / "a.jsonl"), val_fraction=0.2))
    assert sorted(train + val) == sorted(f"doc {i}" for i in range(20))  # blank doc dropped
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x y"}, {"body": "z"}]))
    train, val = _docs(DataConfig(source=str(tmp_path / "b.json"), text_field="body"))
    assert sorted(train + val) == ["x y", "z"]


def test_parquet_folder_recursive_and_max_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, where in enumerate([tmp_path, tmp_path / "sub"]):
        table = pa.table({"content": [f"p{i}-{j}" for j in range(5)], "n": list(range(5))})
        pq.write_table(table, where / f"part{i}.parquet")
    cfg = DataConfig(source=str(tmp_path), text_field="content")
    train, val = _docs(cfg)
    assert sorted(train + val) == sorted(f"p{i}-{j}" for i in range(2) for j in range(5))
    capped = load_corpus(DataConfig(source=str(tmp_path), text_field="content", max_documents=4))
    assert len(capped.train_ids) + len(capped.val_ids) == 4


def test_split_by_document_index_is_deterministic(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": f"d{i}"} for i in range(50)])
    cfg = DataConfig(source=str(tmp_path / "a.jsonl"), val_fraction=0.2)
    assert _docs(cfg) == _docs(cfg)
    val = load_corpus(cfg).val_ids.tolist()
    assert val == [i for i in range(50) if stable_fraction(str(i)) < 0.2]


def test_mixed_folder_and_empty_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}])
    with pytest.raises(DataError, match="mixed file kinds"):
        load_corpus(DataConfig(source=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl/.json/.parquet files"):
        load_corpus(DataConfig(source=str(tmp_path / "empty")))


def test_hub_name_detection():
    assert looks_like_hub_name("roneneldan/TinyStories")
    assert looks_like_hub_name("wikitext")
    for path in ("./data.txt", "/abs/corpus", "corpus.jsonl", "a/b/c", "~/x", "data.parquet"):
        assert not looks_like_hub_name(path), path


# ---- bad data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["./nope.txt", "/no/such/corpus.jsonl", "a/b/c", "x.parquet"])
def test_missing_path(source):
    with pytest.raises(DataError, match=f"not found: {source}"):
        load_corpus(DataConfig(source=source))


def test_empty_corpus(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus") as err:
        load_corpus(DataConfig(source=str(path), text_sample_by="line"))
    assert str(path) in str(err.value)


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError) as err:
        load_corpus(DataConfig(source=str(path)))
    assert f"{path}: line 3" in str(err.value) and "UTF-8" in str(err.value)


def test_non_utf8_in_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=f"{path}: line 2: not valid UTF-8"):
        load_corpus(DataConfig(source=str(path)))


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError) as err:
        load_corpus(DataConfig(source=str(path)))
    message = str(err.value)
    assert f"{path}: line 2" in message and "'text'" in message


def test_jsonl_non_string_field(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok"}, {"text": 3}])
    with pytest.raises(DataError, match=f"{path}: line 3: field 'text' is int"):
        load_corpus(DataConfig(source=str(path)))


def test_jsonl_invalid_json_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}: line 3: invalid JSON"):
        load_corpus(DataConfig(source=str(path)))


def test_parquet_missing_field(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=f"{path}: no field 'text'"):
        load_corpus(DataConfig(source=str(path)))
