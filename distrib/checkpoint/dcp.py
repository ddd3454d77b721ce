"""Writing and reading a checkpoint's files with torch.distributed.checkpoint (DCP).

Each rank writes its own shards; any layout can read them back, resharding by name. In the
background, `dcp.async_save` stages the state into CPU buffers in the training thread and
writes from a thread of its own, with its collectives on a process group of their own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions

from distrib.checkpoint.state import ModelState, flatten, optional_keys, restore
from distrib.errors import CheckpointError

# One process saves in the background too where DCP allows it (torch >= 2.11 has no_dist there).
_ASYNC_NO_DIST = "no_dist" in inspect.signature(dcp.async_save).parameters

# Writes one checkpoint's files into a folder, in the background when asked (returning a future
# that completes when the files are on disk), else before returning None.
Writer = Callable[[Path, bool], "Future[Any] | None"]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _dcp_call() -> Iterator[bool]:
    """Yield whether DCP should skip collectives; at world size 1 that is the intent, so DCP's
    warning about it says nothing the user needs."""
    single = not distributed()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield single


def dcp_writer(
    state: Mapping[str, Any],
    process_group: dist.ProcessGroup | None = None,
    stager: AsyncStager | None = None,
) -> Writer:
    """A `Writer` that saves `state` (Stateful objects and plain values) with DCP; in the
    background through `dcp.async_save`, whose collectives run on `process_group` so they never
    interleave with training's."""

    def write(folder: Path, background: bool) -> Future[Any] | None:
        flat = flatten(dict(state))
        with _dcp_call() as single:
            if background and (not single or _ASYNC_NO_DIST):
                extra = {"no_dist": True} if single else {"process_group": process_group}
                if stager is not None:
                    extra["async_stager"] = stager
                return dcp.async_save(flat, checkpoint_id=str(folder), **extra)  # type: ignore[return-value]
            dcp.save(flat, checkpoint_id=str(folder), no_dist=single)
        return None

    return write


def caching_stager() -> AsyncStager:
    """DCP's stager, kept for the run: it copies the state into CPU buffers it reuses from one
    save to the next (pinned on GPU machines), in the training thread, so training may change
    the tensors as soon as `save` returns."""
    cuda = torch.cuda.is_available()
    options = StagingOptions(
        use_pinned_memory=cuda,
        use_shared_memory=False,
        use_async_staging=False,
        use_non_blocking_copy=cuda,
    )
    return DefaultStager(options) if _stager_reuses_buffers() else _StagerPerSave(options)


@functools.cache
def _stager_reuses_buffers() -> bool:
    """Whether one `DefaultStager` stages several times, into the same buffers. torch 2.11 and
    2.12 end every `DefaultStager.stage()` with `StateDictStager.close()`, which empties both its
    storage cache (no reuse) and its deepcopy dispatch table, so the next `stage()` fails on the
    first non-tensor value (`KeyError: <class 'type'>`); 2.13 dropped that call. Tried on a
    one-element tensor rather than read off the version."""
    probe = DefaultStager(StagingOptions(False, False, False, False))
    tensor = torch.zeros(1)
    try:
        first = probe.stage({"t": tensor, "n": 0})["t"]
        second = probe.stage({"t": tensor, "n": 0})["t"]
    except Exception:
        return False
    finally:
        probe.close()
    return first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


class _StagerPerSave(AsyncStager):
    """Where a `DefaultStager` works once (torch < 2.13): a new one for each save, same options,
    so the buffers are allocated anew each time."""

    def __init__(self, options: StagingOptions) -> None:
        self.options = options

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return DefaultStager(self.options).stage(state_dict)  # type: ignore[return-value]

    def synchronize_staging(self) -> None:
        """Nothing to wait for: `stage` copies before it returns."""


def load(path: Path, state: dict[str, Any]) -> None:
    """Load `path` into `state` in place (Stateful objects load themselves; plain values are
    replaced). Keys the checkpoint lacks are an error, except the optional ones: RNG states of
    ranks the saving run did not have, and entries older checkpoints lack."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    top = {k.split(".", 1)[0] for k in metadata}
    flat = flatten(state)
    optional = optional_keys(state) | {k for k in flat if _optional(k)}
    wanted = {k: v for k, v in flat.items() if k in top or k not in optional}
    missing = [k for k in wanted if k not in top]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing}; it holds {sorted(top)}")
    for key, value in wanted.items():
        if isinstance(value, ModelState):
            _check_shapes(path, key, value.state_dict(), metadata)
    with _dcp_call() as single:
        dcp.load(wanted, checkpoint_id=str(path), no_dist=single)
    restore(state, wanted)
    for key in state:
        if key in wanted:
            state[key] = wanted[key]


def _check_shapes(
    path: Path, key: str, tensors: dict[str, Any], metadata: Mapping[str, Any]
) -> None:
    """Refuse, naming the first tensor and both shapes, a checkpoint whose tensors do not fit
    the model: DCP itself fails deep inside its planner with a message that names neither."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        saved = metadata.get(f"{key}.{name}")
        size = getattr(saved, "size", None)
        if saved is None:
            problem = "is not in the checkpoint"
        elif size is not None and tuple(size) != tuple(tensor.shape):
            problem = f"is {list(size)} in the checkpoint but {list(tensor.shape)} in this model"
        else:
            continue
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: {name} {problem} (the model config "
            "changed since it was written); start a new run folder (job.run_dir), or start over "
            "in this one with checkpoint.resume = never and job.overwrite = true"
        )


def _optional(key: str) -> bool:
    # Plain-dict callers name RNG states and skipped steps directly.
    return key.startswith("rng_rank") or key == "skip_steps"
