"""Integrity of prepared datasets: spot digests at open, `prepare --verify`, token range per
batch, leftovers of interrupted preparations, and the default corpus without data tables."""

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from distrib.cli import main
from distrib.config import DataConfig, ModelConfig
from distrib.data.loader import TokenLoader
from distrib.data.prepare import is_up_to_date, prepare_dataset
from distrib.data.shards import (
    MANIFEST_FILE,
    TokenShards,
    atomic_dir,
    host_name,
    spot_digest,
    write_token_dataset,
)
from distrib.data.sources import looks_like_table, stdlib_documents
from distrib.data.verify import report_leftovers, tidy_leftovers
from distrib.errors import DataError
from distrib.train.trainer import check_dataset

EOS = 0
DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: no process has it


def _dataset(dir: Path, vocab: int = 500, train: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    if train is None:
        train = rng.integers(1, vocab, size=100)
    val = rng.integers(1, vocab, size=30)
    return write_token_dataset(dir, {"train": train, "val": val}, vocab, EOS, max_shard_tokens=10)


def _flip(path: Path, at: int = 3) -> None:
    """Damage a file in place: same size, one byte changed."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the cheap check at open, the full one on demand --------------------------------------------


def test_spot_digest_reads_first_and_last_blocks(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).bytes(100_000))
    before = spot_digest(path, blocks=8, block_bytes=4096)
    for at, seen in [(0, True), (99_999, True), (50_000, False)]:
        _flip(path, at)
        assert (spot_digest(path, 8, 4096) != before) == seen, at
        _flip(path, at)  # undo
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)  # smaller than 8 blocks: hashed whole
    digest = spot_digest(small)
    _flip(small, 500)
    assert spot_digest(small) != digest


def test_open_refuses_a_shard_damaged_in_place(tmp_path):
    dir = _dataset(tmp_path / "ds")
    manifest = json.loads((dir / MANIFEST_FILE).read_text())
    assert manifest["spot_check"] == {"blocks": 8, "block_bytes": 4096}
    assert all(len(s["spot_sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])
    TokenShards.open(dir, "train")
    _flip(dir / "train-00004.bin")
    with pytest.raises(DataError, match=r"train-00004\.bin: bytes changed in place") as err:
        TokenShards.open(dir, "train")
    assert "distrib prepare --verify" in str(err.value)
    assert "distrib prepare --force" in str(err.value)
    assert "train-00003.bin" not in str(err.value)
    TokenShards.open(dir, "val")  # the other split is whole


def test_manifest_without_spot_digests_still_opens(tmp_path):
    dir = _dataset(tmp_path / "ds")
    path = dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["spot_check"]  # as written before spot digests
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["spot_sha256"]
    path.write_text(json.dumps(manifest))
    _flip(dir / "train-00001.bin")
    shards = TokenShards.open(dir, "train")  # sizes only
    assert shards.num_tokens == 100
    with pytest.raises(DataError, match=r"train-00001\.bin: sha256"):
        shards.verify()


def test_prepare_rebuilds_a_damaged_dataset(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "ds"), max_documents=8, val_fraction=0.2)
    lines: list[str] = []
    dir = prepare_dataset(cfg, 300, seed=0, log=lines.append, max_shard_tokens=4000)
    assert is_up_to_date(cfg, 300, 0)
    _flip(dir / "train-00001.bin", at=0)  # in the first block, which the spot digest reads
    lines.clear()
    prepare_dataset(cfg, 300, seed=0, log=lines.append, max_shard_tokens=4000)
    assert not any("up to date" in line for line in lines), lines
    assert "damaged" in lines[0] and "train-00001.bin" in lines[0]
    assert lines[-1].startswith("prepared")
    TokenShards.open(dir, "train").verify()


def test_default_corpus_recipe_carries_the_filter_version(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "ds"), max_documents=4, val_fraction=0.3)
    dir = prepare_dataset(cfg, 300, seed=0, log=lambda _: None)
    path = dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest["recipe"]["stdlib_filter"] >= 1
    assert "generated data tables left out" in manifest["source"]
    del manifest["recipe"]["stdlib_filter"]  # a dataset prepared before the filter
    path.write_text(json.dumps(manifest))
    assert not is_up_to_date(cfg, 300, 0)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["prepare", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_verify(tmp_path, capsys):
    dir = _dataset(tmp_path / "ds")
    code, out, err = _run(capsys, "--verify", f"--data.dir={dir}")
    assert code == 0 and err == ""
    assert out.count("\n") == 1 and "verified" in out and "13 shards" in out
    _flip(dir / "train-00002.bin", at=7)
    (dir / "val-00001.bin").write_bytes(b"\0" * 4)
    damaged = {p.name: p.read_bytes() for p in dir.iterdir()}
    code, out, err = _run(capsys, "--verify", f"--data.dir={dir}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "2 of 13 shards damaged" in err
    assert "train-00002.bin: sha256" in err and "val-00001.bin: 4 bytes" in err
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in dir.iterdir()} == damaged  # nothing changed
    code, out, err = _run(capsys, "--verify", f"--data.dir={tmp_path / 'nope'}")
    assert code == 2 and "no prepared dataset" in err


# ---- token ids against the vocabulary, per batch ------------------------------------------------


def test_out_of_vocabulary_id_names_shard_and_offset(tmp_path):
    train = np.random.default_rng(1).integers(1, 500, size=100)
    train[37] = 600  # shard 3 (10 tokens each), offset 7; vocab 500
    dir = _dataset(tmp_path / "ds", vocab=500, train=train)
    loader = TokenLoader(TokenShards.open(dir, "train"), 8, 4, 2, 0, 1, 0, shuffle=False)
    loader.next_step()  # samples 0-3: tokens 0..32
    with pytest.raises(DataError) as err:
        loader.next_step()  # samples 4-7: token 37 is in sample 4
    message = str(err.value)
    assert "token id 600 at token 7 of" in message and "train-00003.bin" in message
    assert "split 'train'" in message and "vocabulary size 500" in message
    assert "distrib prepare --verify" in message
    assert loader.batch_index == 1  # the bad batch did not advance the loader


# ---- leftovers of interrupted preparations ------------------------------------------------------


def _leftovers(parent: Path) -> dict[str, Path]:
    host = host_name()
    names = {
        "dead": f"ds.tmp-{host}-{DEAD_PID}",
        "dead_old": f"ds.old-{host}-{DEAD_PID}",
        "alive": f"ds.tmp-{host}-{os.getpid()}",
        "other_host": f"ds.tmp-elsewhere-7-{DEAD_PID}",
        "old_naming": f"ds.tmp-{DEAD_PID}",
    }
    paths = {k: parent / v for k, v in names.items()}
    for path in paths.values():
        path.mkdir()
    (parent / "ds.backup").mkdir()  # not a working folder
    return paths


def test_atomic_dir_names_host_and_pid(tmp_path):
    with atomic_dir(tmp_path / "ds") as tmp:
        assert tmp.name == f"ds.tmp-{host_name()}-{os.getpid()}"


def test_leftovers_of_this_host_with_a_dead_pid_are_removed(tmp_path):
    _dataset(tmp_path / "ds")
    paths = _leftovers(tmp_path)
    lines: list[str] = []
    report_leftovers(tmp_path / "ds", lines.append)
    assert all(p.exists() for p in paths.values()) and len(lines) == 1
    lines.clear()
    removed = tidy_leftovers(tmp_path / "ds", lines.append)
    assert sorted(removed) == sorted([paths["dead"], paths["dead_old"]])
    assert not paths["dead"].exists() and not paths["dead_old"].exists()
    assert paths["alive"].exists() and paths["other_host"].exists()
    assert paths["old_naming"].exists() and (tmp_path / "ds.backup").exists()
    assert len(lines) == 2 and lines[0].startswith("removed 2 folder(s)")
    assert "from host elsewhere-7" in lines[1] and f"pid {os.getpid()} still runs" in lines[1]
    assert paths["old_naming"].name in lines[1]


def test_leftover_holding_the_only_complete_dataset_is_kept(tmp_path):
    _dataset(tmp_path / "ds")
    moved = tmp_path / f"ds.old-{host_name()}-{DEAD_PID}"
    (tmp_path / "ds").rename(moved)  # killed between the two renames of atomic_dir
    lines: list[str] = []
    assert tidy_leftovers(tmp_path / "ds", lines.append) == []
    assert moved.exists() and "restores it" in lines[0]


def test_prepare_tidies_and_training_reports_leftovers(tmp_path, capsys):
    cfg = DataConfig(dir=str(tmp_path / "ds"), max_documents=4, val_fraction=0.3, seq_len=8)
    paths = _leftovers(tmp_path)
    lines: list[str] = []
    prepare_dataset(cfg, 300, seed=0, log=lines.append)
    assert lines[0].startswith("removed 2 folder(s)") and not paths["dead"].exists()
    stale = tmp_path / f"ds.tmp-{host_name()}-{DEAD_PID}"
    stale.mkdir()
    lines.clear()
    check_dataset(cfg, ModelConfig(vocab_size=300), lines.append)  # what `distrib train` runs
    assert stale.name in lines[0] and stale.exists()  # reported, not removed


# ---- the default corpus without generated data tables -------------------------------------------

_MODULE = '''"""A small ordinary module."""

import os


def walk(root: str, depth: int = 0) -> list[str]:
    """Files under `root`, at most `depth` levels down."""
    found = []
    for entry in os.scandir(root):
        if entry.is_dir() and depth > 0:
            found += walk(entry.path, depth - 1)
        elif entry.name.endswith(".py"):
            found.append(entry.path)
    return found
'''


def test_table_heuristic_on_synthetic_sources():
    table = "codes = {\n" + "".join(f"    'name{i}': 0x{i:04x},\n" for i in range(400)) + "}\n"
    assert len(table) > 4096 and looks_like_table(table)
    strings = "table = (\n" + "".join(f"    '\\x{i:02x}'  # 0x{i:02x}\n" for i in range(256))
    assert looks_like_table(strings + ")\n")
    module = _MODULE * 12
    assert len(module) > 4096 and not looks_like_table(module)
    assert not looks_like_table(table[:3000])  # small files are kept whatever they hold


def test_stdlib_corpus_leaves_out_generated_tables():
    root = Path(sysconfig.get_paths()["stdlib"])
    keys, texts, tables = stdlib_documents(root)
    for name in ["encodings/cp1252.py", "pydoc_data/topics.py", "html/entities.py"]:
        assert name in tables and name not in keys
    for name in ["os.py", "json/decoder.py", "typing.py", "encodings/utf_8.py", "argparse.py"]:
        assert name in keys
    assert len(tables) < len(keys) / 5
    assert sum(map(len, texts)) > 5_000_000  # about 10 MB of code
