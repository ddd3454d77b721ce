"""Checkpoints: the checkpointer (save, keep, validate, resume), the manifest, the state objects a
checkpoint holds, DCP's files and DeepSpeed's format, and loading a run for generate/export."""

from distrib.checkpoint import manifest
from distrib.checkpoint.checkpointer import Checkpointer, is_complete, list_checkpoints, step_dir
from distrib.checkpoint.dcp import dcp_writer, load
from distrib.checkpoint.run_folder import RunFolder, claim, claim_on_every_rank
from distrib.checkpoint.state import (
    ModelState,
    OptimizerState,
    RNGState,
    SchedulerState,
    TrainState,
    rng_key,
)

__all__ = [
    "Checkpointer",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "RunFolder",
    "SchedulerState",
    "TrainState",
    "claim",
    "claim_on_every_rank",
    "dcp_writer",
    "is_complete",
    "list_checkpoints",
    "load",
    "manifest",
    "rng_key",
    "step_dir",
]
