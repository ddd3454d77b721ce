"""What a checkpoint holds, as `Stateful` objects handed to the checkpointer.

The engine contributes its own (model, optimizer and LR schedule for the native engine; the
whole DeepSpeed engine for the other); the trainer adds the loader, the train state (step and
the steps whose batch is passed over) and this rank's random generators. The checkpointer never
looks inside them.

`RootState` objects keep the names that checkpoints have always used: their entries sit at the
top of the saved dict ("step", "skip_steps", "rng_rank<R>"), not under a key of their own, so a
checkpoint written before these objects existed still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from distrib.runtime import rng_state, set_rng_state

# Optimizer state keyed by flat names ("state.layers.0.attention.wq.weight.exp_avg"), so the
# states of several model parts (pipeline stages) merge into one dict and reshard by name.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _as_parts(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return model if isinstance(model, list) else [model]


class ModelState(Stateful):
    """The weights of this rank's model parts in DCP form (sharded tensors stay sharded).

    `trainable_only` leaves out frozen parameters (a LoRA run's base, which comes from
    `model.init_from` whenever the run is built), so the checkpoint holds the adapters only.
    """

    def __init__(self, model: nn.Module | list[nn.Module], trainable_only: bool = False) -> None:
        self.parts = _as_parts(model)
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)

    def state_dict(self) -> dict[str, Any]:
        return {
            k: v
            for part in self.parts
            for k, v in get_model_state_dict(part, options=self.options).items()
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.parts:
            # Each part takes the names it has; a pipeline stage holds only some layers.
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    """One optimizer per model part, saved as one flat name-keyed dict."""

    def __init__(
        self,
        model: nn.Module | list[nn.Module],
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    ) -> None:
        self.parts = _as_parts(model)
        self.optimizers = optimizer if isinstance(optimizer, list) else [optimizer]

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            merged.update(get_optimizer_state_dict(part, opt, options=_FLAT))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.parts, self.optimizers, strict=True):
            set_optimizer_state_dict(part, opt, state_dict, options=_FLAT)


class SchedulerState(Stateful):
    """The LR schedules of all parts' optimizers, which move in lockstep: saved once."""

    def __init__(self, schedulers: list[Any]) -> None:
        self.schedulers = schedulers

    def state_dict(self) -> dict[str, Any]:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state_dict)


class RootState(Stateful):
    """A state whose entries are saved at the top of the checkpoint under fixed names.
    `optional` names may be absent from a checkpoint: the value then stays as it is."""

    optional: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError


class TrainState(RootState):
    """The step reached and the steps whose batch is passed over after a rollback."""

    optional = ("skip_steps",)  # older checkpoints lack it

    def __init__(self) -> None:
        self.step = 0
        self.skip_steps: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skip_steps": list(self.skip_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.skip_steps = [int(s) for s in state_dict.get("skip_steps", self.skip_steps)]


def rng_key(rank: int) -> str:
    # Each rank's generators differ, and DCP keeps one copy of a replicated non-tensor value,
    # so every rank saves its RNG under its own key.
    return f"rng_rank{rank}"


class RNGState(RootState):
    """This rank's Python, NumPy and torch generators. A rank the saving run did not have
    keeps its fresh generators (the key is optional)."""

    def __init__(self, rank: int) -> None:
        self.key = rng_key(rank)
        self.optional = (self.key,)

    def state_dict(self) -> dict[str, Any]:
        return {self.key: rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(state_dict.get(self.key), dict):
            set_rng_state(state_dict[self.key])


@runtime_checkable
class OwnFormat(Protocol):
    """Engine state that writes its own files into the step folder instead of going through
    DCP (DeepSpeed's checkpoint); every rank calls both methods together."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def flatten(states: dict[str, Any]) -> dict[str, Any]:
    """The dict to save: `RootState` entries spread at the top, everything else by its key."""
    flat: dict[str, Any] = {}
    for key, value in states.items():
        if isinstance(value, RootState):
            flat.update(value.state_dict())
        else:
            flat[key] = value
    return flat


def optional_keys(states: dict[str, Any]) -> set[str]:
    """Top-level names a checkpoint may lack without being refused."""
    return {k for v in states.values() if isinstance(v, RootState) for k in v.optional}


def restore(states: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Hand the loaded top-level values back to the `RootState` objects in `states`."""
    for value in states.values():
        if isinstance(value, RootState):
            mine = {k: loaded[k] for k in value.state_dict() if k in loaded}
            value.load_state_dict(mine)
