"""A run's trained model for one process: the config and tokenizer saved in the run folder, and
the weights of its newest (or a given) checkpoint, whichever engine wrote it. For `distrib
generate` and `distrib export`. A LoRA run's model is its base (`model.init_from`, checked to be
the one it was trained on) with the checkpoint's adapters, not merged.

The checkpoint is opened as training resumes one: the `Checkpointer` validates it (sizes and
checksums against its manifest) and, for the newest, falls back past damaged ones, reporting
each; only the checkpoints of the run that owns the folder are considered.
"""

from __future__ import annotations

import dataclasses
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
from distrib.checkpoint.lora_base import BASE_KEY, base_digest, check_same_base
from distrib.checkpoint.state import ModelState
from distrib.config import CheckpointConfig, Config, from_dict
from distrib.data.tokenizer import Tokenizer
from distrib.errors import CheckpointError, UserError
from distrib.models.build import build_empty, build_on_meta
from distrib.models.lora import apply_lora, is_adapter
from distrib.parallel.init import load_hf_weights


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def find_checkpoint(
    run_dir: Path, step: int | None, report: Callable[[str], None] = _warn, verify: bool = True
) -> Path:
    """The newest intact checkpoint of `run_dir` (damaged newer ones reported and passed over),
    or the one of `step`, which must then be intact; `verify = False` checks file sizes, not
    checksums (for a checkpoint whose contents were just verified by loading it)."""
    checkpointer = Checkpointer(
        CheckpointConfig(verify=verify), run_dir, owner=run_folder.reader(run_dir)
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
    lora = cfg.lora.rank > 0
    # The weights come from the checkpoint; a LoRA run's checkpoint holds only the adapters.
    model = _lora_base(cfg, path, device) if lora else build_empty(cfg.model, device)
    try:
        if (path / "deepspeed").is_dir():  # written by parallel.engine = "deepspeed"
            _load_deepspeed(model, path, cfg.model.tie_embeddings, adapters_only=lora)
        else:
            load(path, {"model": ModelState(model, trainable_only=lora)})
    except UserError:
        raise
    except Exception as err:  # a format error deep in DCP or DeepSpeed: name the checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({cause(err)})") from err
    return model, Tokenizer.load(run_dir / "tokenizer.json"), cfg


def _lora_base(cfg: Config, checkpoint: Path, device: torch.device) -> nn.Module:
    """The whole model of the LoRA run `cfg` on `device`, in float32: the base weights from its
    `model.init_from` (refused if they are not those the adapters of `checkpoint` were trained
    on), and adapters still to be loaded."""
    from distrib.checkpoint.init_from import load_run_weights

    source = cfg.model.init_from
    check_same_base(
        checkpoint, manifest.read(checkpoint).get(BASE_KEY), base_digest(source, collective=False)
    )
    model = build_on_meta(cfg.model)
    apply_lora(model, dataclasses.replace(cfg.lora, base_dtype="float32"))
    model.to_empty(device=device)
    model.init_buffers()
    if source.startswith("run:"):
        load_run_weights([model], source)
    else:
        load_hf_weights([model], source.removeprefix("hf:"), cfg.model)
    return model


def _load_deepspeed(model: nn.Module, path: Path, tied: bool, adapters_only: bool) -> None:
    missing, unexpected = model.load_state_dict(consolidated_weights(path), strict=False)
    expected_missing = {"output.weight"} if tied else set()
    if adapters_only:  # a LoRA run's checkpoint: the base weights come from model.init_from
        expected_missing |= {n for n in model.state_dict() if not is_adapter(n)}
    if unexpected or set(missing) - expected_missing:
        raise CheckpointError(
            f"{path}: DeepSpeed weights do not fit the run's model: missing "
            f"{sorted(set(missing) - expected_missing)}, unexpected {sorted(unexpected)}"
        )
