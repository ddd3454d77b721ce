"""Memmap shards: writing, reading across shard boundaries, manifest, verification, atomicity."""

import json

import numpy as np
import pytest

from distrib.data.shards import (
    MANIFEST_FILE,
    ShardWriter,
    TokenShards,
    atomic_dir,
    token_dtype,
    write_token_dataset,
)
from distrib.errors import DataError

EOS = 0


def _stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=n)
    tokens[rng.random(n) < 0.1] = EOS
    tokens[-1] = EOS
    return tokens


def test_dtype_choice():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


@pytest.mark.parametrize("vocab", [500, 100_000])
def test_round_trip_across_shards(tmp_path, vocab):
    train, val = _stream(103, vocab), _stream(20, vocab, seed=1)
    write_token_dataset(
        tmp_path / "ds", {"train": train, "val": val}, vocab, EOS, max_shard_tokens=10
    )
    shards = TokenShards.open(tmp_path / "ds", "train")
    assert shards.num_tokens == 103 and len(shards.shards) == 11
    assert shards.dtype == token_dtype(vocab) and shards.vocab_size == vocab
    assert shards.eos_id == EOS
    assert (tmp_path / "ds" / "train-00010.bin").stat().st_size == 3 * shards.dtype.itemsize
    for start, length in [(0, 103), (5, 10), (9, 2), (10, 10), (17, 45), (102, 1), (50, 0)]:
        np.testing.assert_array_equal(shards.window(start, length), train[start : start + length])
    starts = np.array([0, 8, 31, 90])
    np.testing.assert_array_equal(
        shards.windows(starts, 13), np.stack([train[s : s + 13] for s in starts])
    )
    with pytest.raises(IndexError):
        shards.window(100, 4)
    assert TokenShards.open(tmp_path / "ds", "val").window(0, 20).tolist() == val.tolist()


def test_manifest_contents(tmp_path):
    train = _stream(25, 500)
    write_token_dataset(tmp_path / "ds", {"train": train, "val": train[:5]}, 500, EOS, 10)
    manifest = json.loads((tmp_path / "ds" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == 500 and manifest["eos_id"] == EOS
    split = manifest["splits"]["train"]
    assert [s["file"] for s in split["shards"]] == [
        "train-00000.bin",
        "train-00001.bin",
        "train-00002.bin",
    ]
    assert [s["num_tokens"] for s in split["shards"]] == [10, 10, 5]
    assert split["num_tokens"] == 25 and split["num_documents"] == int((train == EOS).sum())
    assert all(len(s["sha256"]) == 64 for s in split["shards"])
    assert manifest["num_tokens"] == 30


def test_writer_rejects_out_of_range_ids(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.uint16, EOS)
    with pytest.raises(DataError, match="out of range"):
        writer.append(np.array([1, 70000]))


def test_verify_detects_corrupted_byte(tmp_path):
    write_token_dataset(
        tmp_path / "ds", {"train": _stream(30, 500), "val": _stream(5, 500)}, 500, EOS, 10
    )
    shards = TokenShards.open(tmp_path / "ds", "train")
    shards.verify()
    path = tmp_path / "ds" / "train-00001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00001.bin: sha256"):
        shards.verify()


def test_open_detects_size_mismatch_and_missing(tmp_path):
    write_token_dataset(
        tmp_path / "ds", {"train": _stream(30, 500), "val": _stream(5, 500)}, 500, EOS, 10
    )
    path = tmp_path / "ds" / "train-00002.bin"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="train-00002.bin: 21 bytes, the manifest says 20"):
        TokenShards.open(tmp_path / "ds", "train")
    path.unlink()
    with pytest.raises(DataError, match="train-00002.bin: shard missing"):
        TokenShards.open(tmp_path / "ds", "train")
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: run `distrib prepare` first"):
        TokenShards.open(tmp_path / "nope", "train")
    (tmp_path / "ds" / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match="no manifest.json in .*run `distrib prepare` first"):
        TokenShards.open(tmp_path / "ds", "train")


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    final = tmp_path / "ds"
    final.mkdir()
    (final / "old").write_text("old dataset")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "new").write_text("half")
        assert final.joinpath("old").exists()  # still the old one while writing
        raise RuntimeError("crash mid-write")
    assert (final / "old").read_text() == "old dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no tmp left behind
    with atomic_dir(final) as tmp:
        (tmp / "new").write_text("complete")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
