"""DCP checkpoints at world size 1: round trip, atomic completion, retention, resume choice."""

from pathlib import Path

import pytest
import torch

from distrib import checkpoint as ckpt
from distrib.config import CheckpointConfig, load_config
from distrib.engines.native import NativeEngine
from distrib.errors import CheckpointError
from distrib.models.build import build_model
from distrib.runtime import rng_state, set_rng_state
from tests.support.tiny import tiny_flags

TINY = [
    *tiny_flags(),
    "--data.seq_len=16",
    "--training.lr=0.01",
    "--training.min_lr=0.001",
    "--training.warmup_steps=2",
    "--training.steps=10",
]


def _engine(seed: int) -> NativeEngine:
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, torch.device("cpu"), seed)
    return NativeEngine([model], cfg.training, torch.device("cpu"))


def _step(engine: NativeEngine) -> None:
    from distrib.data.loader import Batch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, engine.model.cfg.vocab_size, (2, 17), generator=g)
    engine.train_step([Batch(inputs=tokens[:, :-1], labels=tokens[:, 1:], doc_ids=None)])


def test_round_trip_restores_model_optimizer_schedule_rng(tmp_path: Path) -> None:
    saved = _engine(seed=1)
    for _ in range(3):
        _step(saved)
    torch.manual_seed(99)
    rng_before = rng_state()
    path = ckpt.Checkpointer(CheckpointConfig(), tmp_path).save(
        3, {**saved.checkpoint_state(), "step": 3, ckpt.rng_key(0): rng_before}
    )
    assert path == tmp_path / "checkpoints" / "step-00000003" and ckpt.is_complete(path)

    torch.manual_seed(5)
    loaded = _engine(seed=2)
    state = {**loaded.checkpoint_state(), "step": 0, ckpt.rng_key(0): rng_state()}
    ckpt.load(path, state)
    set_rng_state(state[ckpt.rng_key(0)])
    assert state["step"] == 3
    assert torch.equal(torch.get_rng_state(), rng_before["torch"])
    for (name, a), b in zip(
        saved.model.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.schedulers[0].last_epoch == saved.schedulers[0].last_epoch == 3
    assert loaded.lr() == saved.lr()
    # The next step is identical: optimizer moments and step counts came back exactly.
    _step(saved)
    _step(loaded)
    for a, b in zip(saved.model.parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incomplete_checkpoints_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    (folder / "step-00000009.tmp").mkdir(parents=True)  # crashed mid-save
    (folder / "step-00000008").mkdir()  # no .metadata: never finished
    (folder / "notes").mkdir()
    assert ckpt.list_checkpoints(folder) == []
    checkpointer = ckpt.Checkpointer(CheckpointConfig(resume="auto"), tmp_path)
    assert checkpointer.resume_path() is None
    checkpointer.save(9, {"step": 9})
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-00000009"]
    assert not (folder / "step-00000009.tmp").exists()


def test_retention_keeps_newest(tmp_path: Path) -> None:
    checkpointer = ckpt.Checkpointer(CheckpointConfig(keep=2), tmp_path)
    for step in (1, 2, 3, 10):
        checkpointer.save(step, {"step": step})
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-00000003", "step-00000010"]
    assert checkpointer.resume_path() == tmp_path / "checkpoints" / "step-00000010"


def test_resume_modes(tmp_path: Path) -> None:
    saver = ckpt.Checkpointer(CheckpointConfig(), tmp_path)
    path = saver.save(4, {"step": 4})
    assert ckpt.Checkpointer(CheckpointConfig(resume="never"), tmp_path).resume_path() is None
    explicit = ckpt.Checkpointer(CheckpointConfig(resume=str(path)), tmp_path / "other")
    assert explicit.resume_path() == path
    bad = ckpt.Checkpointer(CheckpointConfig(resume=str(tmp_path / "nope")), tmp_path)
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        bad.resume_path()


def test_due_on_interval_and_last_step(tmp_path: Path) -> None:
    checkpointer = ckpt.Checkpointer(CheckpointConfig(interval=5), tmp_path)
    assert [s for s in range(1, 13) if checkpointer.due(s, 12)] == [5, 10, 12]
    never = ckpt.Checkpointer(CheckpointConfig(interval=0), tmp_path)
    assert [s for s in range(1, 13) if never.due(s, 12)] == [12]


def test_load_names_missing_keys(tmp_path: Path) -> None:
    path = ckpt.Checkpointer(CheckpointConfig(), tmp_path).save(1, {"step": 1})
    with pytest.raises(CheckpointError, match="has no \\['model'\\]"):
        ckpt.load(path, {"model": ckpt.ModelState(_engine(0).model), "step": 0})
    # A rank that did not exist at save time finds no RNG state and keeps its own.
    state = {"step": 0, ckpt.rng_key(3): {"torch": torch.get_rng_state()}}
    ckpt.load(path, state)
    assert state["step"] == 1
