"""Per-block torch.compile, applied to `model.layers` in place."""

from __future__ import annotations

from torch import nn

from distrib.models.moe import moe_layers


def apply_compile(model: nn.Module, *, backend: str = "inductor") -> None:
    """torch.compile each block of `model.layers` separately, in place.

    Per block, not the whole model: the blocks are identical, so one compilation serves all
    (recompiled only per distinct input shape), and the embedding, head and pipeline cuts stay
    eager. Call after `apply_ac`, so the checkpointed blocks are what gets compiled, and before
    FSDP/DDP. `Module.compile` compiles in place, so the block keeps its key and its parameter
    names (no `_orig_mod.` segment). Not fullgraph: a host sync (flash varlen's max length)
    becomes a graph break rather than an error.

    A block with a Mixture-of-Experts layer compiles its attention and norms and leaves the MoE
    layer eager: its dispatch sizes are data (host reads of the per-expert counts), and under
    expert parallelism its all-to-all hooks and sharded expert weights do not trace.
    """
    for block in model.layers.values():
        moe = moe_layers(block)
        if not moe:
            block.compile(backend=backend)
            continue
        for name, module in block.named_modules():
            if name.endswith(("attention", "attention_norm", "ffn_norm")):
                module.compile(backend=backend)
