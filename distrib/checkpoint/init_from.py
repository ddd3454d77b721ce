"""`model.init_from = "run:DIR[@STEP]"`: start a run from another distrib run's checkpoint.

The model keys come from the checkpoint's own config (its manifest), so a fine-tuning config
names the run and nothing of its shape; the weights are loaded by DCP straight into this run's
parallelized parts, each rank reading only its own slices, whatever layout either run used. A
checkpoint written by the DeepSpeed engine is read whole (its format is not resharded by DCP).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from distrib.checkpoint.dcp import _check_shapes, _dcp_call
from distrib.checkpoint.deepspeed import consolidated_weights
from distrib.checkpoint.run import _run_config, find_checkpoint
from distrib.checkpoint.state import ModelState
from distrib.config import ModelConfig
from distrib.errors import CheckpointError, ConfigError

PREFIX = "run:"

# Model keys a run's checkpoint does not decide: how attention is computed, how far the RoPE
# tables reach, and the MoE training options; everything else is the checkpoint's.
NOT_DECIDED = frozenset(
    {
        "attention",
        "init_std",
        "init_from",
        "max_seq_len",
        "moe_aux_loss_coef",
        "moe_z_loss_coef",
        "moe_bias_update_rate",
        "moe_kernel",
    }
)


# Model keys the checkpoint decides unless the user sets them: RoPE's base and scaling change
# no weight, and extending a model's context (continued pre-training on longer sequences) is
# exactly setting them anew.
ROPE_KEYS = frozenset(
    {
        "rope_theta",
        "rope_scaling",
        "rope_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_seq_len",
        "rope_beta_fast",
        "rope_beta_slow",
        "rope_attention_factor",
    }
)


def parse_run_source(spec: str) -> tuple[Path, int | None]:
    """`run:DIR` or `run:DIR@STEP` as (run folder, step or None for the newest intact one)."""
    body = spec.removeprefix(PREFIX)
    folder, at, step = body.rpartition("@")
    if at and step.isdigit():
        return Path(folder).expanduser(), int(step)
    if at and not step.isdigit():
        raise ConfigError(
            f"model.init_from = '{spec}': the part after '@' must be a step number, got '{step}'"
        )
    return Path(body).expanduser(), None


def _source_checkpoint(spec: str) -> tuple[Path, Path]:
    run_dir, step = parse_run_source(spec)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"model.init_from = '{spec}': {run_dir} is not a distrib run folder (no config.json)"
        )
    try:
        return run_dir, find_checkpoint(run_dir, step)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from = '{spec}': {err}") from None


def run_model_config(cfg: ModelConfig, explicit: set[str] | frozenset[str]) -> ModelConfig:
    """`cfg` with the model keys of the checkpoint `cfg.init_from` names. A key in `explicit`
    (set by the user) that contradicts the checkpoint is refused, naming both values, except
    the RoPE keys (`ROPE_KEYS`), which a context extension sets anew."""
    run_dir, path = _source_checkpoint(cfg.init_from)
    theirs = _run_config(run_dir, path).model
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in NOT_DECIDED:
            continue
        ours, their = getattr(cfg, f.name), getattr(theirs, f.name)
        if f.name in explicit and f.name in ROPE_KEYS:
            continue
        if f.name in explicit and ours != their:
            raise ConfigError(
                f"model.{f.name} = {ours!r} contradicts model.init_from: the checkpoint {path} "
                f"was trained with {their!r}; drop model.{f.name} or set it to {their!r}"
            )
        values[f.name] = their
    return dataclasses.replace(cfg, **values)


def run_tokenizer(spec: str) -> Path:
    """The tokenizer the run `spec` names was trained with (the copy in its run folder)."""
    run_dir, _ = parse_run_source(spec)
    return run_dir / "tokenizer.json"


class _PresentWeights(Stateful):
    """The parts' weights the checkpoint holds: adapters added since (LoRA) keep their values."""

    def __init__(self, parts: list[nn.Module], saved: set[str]) -> None:
        self.model = ModelState(parts)
        self.saved = saved

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.state_dict().items() if f"model.{k}" in self.saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.model.load_state_dict(state_dict)


def load_run_weights(parts: list[nn.Module], spec: str) -> Path:
    """Overwrite this rank's model parts with the weights of the checkpoint `spec` names; every
    rank calls it. Returns the checkpoint folder."""
    _, path = _source_checkpoint(spec)
    if (path / "deepspeed").is_dir():
        _load_consolidated(parts, path)
        return path
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = _PresentWeights(parts, set(metadata))
    ours = weights.state_dict()
    if not ours:
        raise CheckpointError(f"checkpoint {path} holds no weights of this model")
    _check_shapes(path, "model", ours, metadata)
    with _dcp_call() as single:
        dcp.load({"model": weights}, checkpoint_id=str(path), no_dist=single)
    return path


def _load_consolidated(parts: list[nn.Module], path: Path) -> None:
    from distrib.parallel.init import load_full_tensors

    full = consolidated_weights(path)

    def tensor_of(name: str) -> Any:
        if name in full:
            return full[name]
        if name == "output.weight" and "tok_embeddings.weight" in full:  # tied in the source
            return full["tok_embeddings.weight"]
        raise KeyError(name)

    load_full_tensors(parts, tensor_of)
