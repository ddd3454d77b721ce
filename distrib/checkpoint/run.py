"""A run's trained model for one process: the config and tokenizer saved in the run folder, and
the weights of its newest (or a given) checkpoint, whichever engine wrote it. For `distrib
generate` and `distrib export`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distrib.checkpoint.checkpointer import is_complete, list_checkpoints, step_dir
from distrib.checkpoint.dcp import load
from distrib.checkpoint.deepspeed import consolidated_weights
from distrib.checkpoint.state import ModelState
from distrib.config import Config, from_dict
from distrib.data.tokenizer import Tokenizer
from distrib.errors import CheckpointError
from distrib.models.build import build_empty


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint of `run_dir`, or the one of `step`."""
    if step is not None:
        path = step_dir(run_dir / "checkpoints", step)
        if not is_complete(path):
            have = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {run_dir}: have {have}"
            )
        return path
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise CheckpointError(f"no complete checkpoint in {run_dir / 'checkpoints'}: train first")
    return found[-1]


def load_run(
    run_dir: Path, step: int | None, device: torch.device
) -> tuple[nn.Module, Tokenizer, Config]:
    """The model (weights from the checkpoint), tokenizer and config of a run."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: {config_path} is missing")
    cfg = from_dict(json.loads(config_path.read_text()))
    model = build_empty(cfg.model, device)  # the weights come from the checkpoint
    path = find_checkpoint(run_dir, step)
    if (path / "deepspeed").is_dir():  # written by parallel.engine = "deepspeed"
        missing, unexpected = model.load_state_dict(consolidated_weights(path), strict=False)
        tied = {"output.weight"} if cfg.model.tie_embeddings else set()
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"{path}: DeepSpeed weights do not fit the run's model: missing "
                f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
            )
    else:
        load(path, {"model": ModelState(model)})
    return model, Tokenizer.load(run_dir / "tokenizer.json"), cfg
