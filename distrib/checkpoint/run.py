"""A run's trained model for one process: the config and tokenizer saved in the run folder, and
the weights of its newest (or a given) checkpoint, whichever engine wrote it. For `distrib
generate` and `distrib export`.

The checkpoint is opened as training resumes one: the `Checkpointer` validates it (sizes and
checksums against its manifest) and, for the newest, falls back past damaged ones, reporting
each; only the checkpoints of the run that owns the folder are considered.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrib.checkpoint import manifest, run_folder
from distrib.checkpoint.checkpointer import Checkpointer, cause, step_dir
from distrib.checkpoint.dcp import load
from distrib.checkpoint.deepspeed import consolidated_weights
from distrib.checkpoint.state import ModelState
from distrib.config import CheckpointConfig, Config, from_dict
from distrib.data.tokenizer import Tokenizer
from distrib.errors import CheckpointError, UserError
from distrib.models.build import build_empty


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def find_checkpoint(run_dir: Path, step: int | None, report: Callable[[str], None] = _warn) -> Path:
    """The newest intact checkpoint of `run_dir` (damaged newer ones reported and passed over),
    or the one of `step`, which must then be intact."""
    checkpointer = Checkpointer(
        CheckpointConfig(verify=True), run_dir, owner=run_folder.reader(run_dir)
    )
    if step is not None:
        path = step_dir(checkpointer.folder, step)
        have = [p.name for p in checkpointer.candidates()]
        if not path.is_dir():
            raise CheckpointError(
                f"no checkpoint for step {step} in {run_dir}: the run has {have or 'none'}"
            )
        found = checkpointer.problems(path)
        if not found and not checkpointer.owns(path):
            found = [f"written by another run than the one owning {run_dir}"]
        if found:
            raise CheckpointError(
                f"checkpoint of step {step} in {run_dir} is not usable: {'; '.join(found[:3])}; "
                f"the run has {have or 'no checkpoints'}"
            )
        return path
    path = checkpointer.newest_valid(report)
    if path is None:
        raise CheckpointError(
            f"no intact checkpoint in {checkpointer.folder}: "
            + ("train first" if not checkpointer.candidates() else "every one is damaged")
        )
    return path


def _run_config(run_dir: Path, checkpoint: Path) -> Config:
    """The config the checkpoint was written with (its manifest), else the run folder's."""
    try:
        saved: Any = manifest.read(checkpoint).get("config")
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        saved = json.loads((run_dir / "config.json").read_text())
    return from_dict(saved)


def load_run(
    run_dir: Path, step: int | None, device: torch.device
) -> tuple[nn.Module, Tokenizer, Config]:
    """The model (weights from the checkpoint), tokenizer and config of a run."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: {config_path} is missing")
    path = find_checkpoint(run_dir, step)
    cfg = _run_config(run_dir, path)
    model = build_empty(cfg.model, device)  # the weights come from the checkpoint
    try:
        if (path / "deepspeed").is_dir():  # written by parallel.engine = "deepspeed"
            _load_deepspeed(model, path, cfg.model.tie_embeddings)
        else:
            load(path, {"model": ModelState(model)})
    except UserError:
        raise
    except Exception as err:  # a format error deep in DCP or DeepSpeed: name the checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({cause(err)})") from err
    return model, Tokenizer.load(run_dir / "tokenizer.json"), cfg


def _load_deepspeed(model: nn.Module, path: Path, tied: bool) -> None:
    missing, unexpected = model.load_state_dict(consolidated_weights(path), strict=False)
    expected_missing = {"output.weight"} if tied else set()
    if unexpected or set(missing) - expected_missing:
        raise CheckpointError(
            f"{path}: DeepSpeed weights do not fit the run's model: missing "
            f"{sorted(set(missing) - expected_missing)}, unexpected {sorted(unexpected)}"
        )
