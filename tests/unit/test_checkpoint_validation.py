"""Manifests, validation with fallback, background saves and failed saves, at world size 1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distrib import checkpoint as ckpt
from distrib.checkpoint import manifest
from distrib.config import CheckpointConfig
from distrib.errors import CheckpointError

ROOT = Path(__file__).parents[2]


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g), "step": seed}


def _saved(tmp_path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> ckpt.Checkpointer:
    saver = ckpt.Checkpointer(CheckpointConfig(keep=0), tmp_path)
    for step in steps:
        saver.save(step, _state(step))
    return saver


def _largest_file(path: Path) -> Path:
    return max(
        (p for p in path.iterdir() if p.name != manifest.MANIFEST), key=lambda p: p.stat().st_size
    )


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    path = _saved(tmp_path, (5,)).folder / "step-00000005"
    doc = json.loads((path / manifest.MANIFEST).read_text())
    assert doc["step"] == 5 and doc["format"] == manifest.FORMAT
    on_disk = sorted(p.name for p in path.iterdir() if p.name != manifest.MANIFEST)
    assert sorted(doc["files"]) == on_disk and ".metadata" in on_disk
    for name, entry in doc["files"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == manifest.sha256(path / name)
    assert manifest.problems(path, checksums=True) == []


def _truncate(path: Path) -> None:
    f = _largest_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_file(path: Path) -> None:
    (path / ".metadata").unlink()


def _flip_byte(path: Path) -> None:  # same size, different contents: only the checksum sees it
    f = _largest_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _no_manifest(path: Path) -> None:  # renamed into place without finishing (a copy tool, say)
    (path / manifest.MANIFEST).unlink()


def _garbled_manifest(path: Path) -> None:
    (path / manifest.MANIFEST).write_text('{"files": ')


CORRUPTIONS = {
    "truncated": (_truncate, "manifest says"),
    "missing file": (_delete_file, ".metadata: missing"),
    "checksum": (_flip_byte, "checksum mismatch"),
    "no manifest": (_no_manifest, "manifest.json"),
    "garbled manifest": (_garbled_manifest, "manifest.json"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_newest_is_reported_and_the_next_older_used(tmp_path: Path, kind: str) -> None:
    saver = _saved(tmp_path)
    newest = saver.folder / "step-00000003"
    damage, message = CORRUPTIONS[kind]
    damage(newest)
    reports: list[str] = []
    assert saver.resume_path(report=reports.append) == saver.folder / "step-00000002"
    assert len(reports) == 1 and str(newest) in reports[0] and message in reports[0]
    # The fallback really loads, and holds step 2's values.
    state = {"w": torch.zeros(64, 64), "b": torch.zeros(64), "step": 0}
    ckpt.load(saver.folder / "step-00000002", state)
    assert state["step"] == 2 and torch.equal(state["w"], _state(2)["w"])


@pytest.mark.parametrize("kind", ["truncated", "checksum", "no manifest"])
def test_explicit_resume_path_to_a_damaged_checkpoint_is_an_error(
    tmp_path: Path, kind: str
) -> None:
    saver = _saved(tmp_path)
    newest = saver.folder / "step-00000003"
    CORRUPTIONS[kind][0](newest)
    explicit = ckpt.Checkpointer(CheckpointConfig(resume=str(newest)), tmp_path)
    with pytest.raises(CheckpointError, match="not a valid checkpoint") as err:
        explicit.resume_path()
    assert str(newest) in str(err.value)


def test_unfinished_tmp_folder_is_never_resumed(tmp_path: Path) -> None:
    saver = _saved(tmp_path, (1,))
    partial = saver.folder / "step-00000002.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert saver.resume_path() == saver.folder / "step-00000001"


def test_all_damaged_means_a_fresh_start_reported(tmp_path: Path) -> None:
    saver = _saved(tmp_path, (1,))
    _flip_byte(saver.folder / "step-00000001")
    reports: list[str] = []
    assert saver.resume_path(report=reports.append) is None
    assert len(reports) == 1


def test_size_check_without_checksums_misses_only_same_size_damage(tmp_path: Path) -> None:
    saver = _saved(tmp_path, (1, 2))
    fast = ckpt.Checkpointer(CheckpointConfig(verify=False), tmp_path)
    _flip_byte(saver.folder / "step-00000002")
    assert fast.resume_path() == saver.folder / "step-00000002"
    _truncate(saver.folder / "step-00000002")
    assert fast.resume_path(report=lambda _: None) == saver.folder / "step-00000001"


def test_background_save_equals_synchronous_save(tmp_path: Path) -> None:
    state = _state(7)
    sync = ckpt.Checkpointer(CheckpointConfig(), tmp_path / "sync").save(7, state)
    background = ckpt.Checkpointer(CheckpointConfig(async_save=True), tmp_path / "async")
    path = background.save(7, state, background=True)
    state["w"].add_(1.0)  # training goes on: the checkpoint must hold the values at save time
    background.wait()
    assert ckpt.is_complete(path)
    assert manifest.problems(path, checksums=True) == []
    a = {"w": torch.zeros(64, 64), "b": torch.zeros(64), "step": 0}
    b = {"w": torch.zeros(64, 64), "b": torch.zeros(64), "step": 0}
    ckpt.load(sync, a)
    ckpt.load(path, b)
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["step"] == b["step"]
    assert torch.equal(b["w"] + 1.0, state["w"])


def test_a_save_that_fails_keeps_the_previous_checkpoints(tmp_path: Path) -> None:
    """A real write failure: the file size limit (RLIMIT_FSIZE) stops the second, larger save
    mid-write, as a full disk would."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from pathlib import Path
        from distrib import checkpoint as ckpt
        from distrib.config import CheckpointConfig
        from distrib.errors import CheckpointError
        saver = ckpt.Checkpointer(CheckpointConfig(), Path({str(tmp_path)!r}))
        saver.save(1, {{"w": torch.ones(16), "step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            saver.save(2, {{"w": torch.ones(1 << 20), "step": 2}})
        except CheckpointError as err:
            print("ERROR:", err)
            sys.exit(3)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "saving step 2" in done.stdout and "previous checkpoints" in done.stdout
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001"]
    assert manifest.problems(folder / "step-00000001", checksums=True) == []
