"""Per-block torch.compile, applied to `model.layers` in place."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, *, backend: str = "inductor") -> None:
    """torch.compile each block of `model.layers` separately, in place.

    Per block, not the whole model: the blocks are identical, so one compilation serves all
    (recompiled only per distinct input shape), and the embedding, head and pipeline cuts stay
    eager. Call after `apply_ac`, so the checkpointed blocks are what gets compiled, and before
    FSDP/DDP. `Module.compile` compiles in place, so the block keeps its key and its parameter
    names (no `_orig_mod.` segment). Not fullgraph: a host sync (flash varlen's max length)
    becomes a graph break rather than an error.
    """
    for block in model.layers.values():
        block.compile(backend=backend)
