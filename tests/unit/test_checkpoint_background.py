"""Background checkpoints at world size 1 through the stager a run keeps (`caching_stager`).

torch 2.11 and 2.12 empty a `DefaultStager` at the end of each `stage()`, so the run's second
background save failed with `KeyError: <class 'type'>`; there the checkpointer takes a new stager
per save, and keeps one (reusing its buffers) where DCP allows it (2.13)."""

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.staging import DefaultStager

from distrib import checkpoint as ckpt
from distrib.checkpoint import dcp as ckpt_dcp
from distrib.config import CheckpointConfig


# DCP's writer thread says so for a single-process save, outside the checkpointer's filter.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_background_saves_through_the_runs_stager_hold_their_steps(tmp_path: Path) -> None:
    checkpointer = ckpt.Checkpointer(CheckpointConfig(async_save=True, keep=0), tmp_path)
    assert checkpointer.stager is not None
    weight = torch.zeros(3)
    for step in (1, 2, 3):
        weight.fill_(step)
        checkpointer.save(step, {"w": weight, "step": step}, background=True)
        weight.fill_(-1.0)  # training goes on once save returns: the staged copy is the step's
    checkpointer.wait()
    for step in (1, 2, 3):
        path = ckpt.step_dir(tmp_path / "checkpoints", step)
        assert ckpt.is_complete(path)
        state = {"w": torch.empty(3), "step": 0}
        ckpt.load(path, state)
        assert state["step"] == step
        assert torch.equal(state["w"], torch.full((3,), float(step)))


def test_one_stager_for_the_run_where_dcp_reuses_its_buffers() -> None:
    reuses = ckpt_dcp._stager_reuses_buffers()
    if torch.__version__ >= "2.13":  # a stager survives its stage() there: keep its buffers
        assert reuses, torch.__version__
    assert isinstance(ckpt_dcp.caching_stager(), DefaultStager) == reuses
