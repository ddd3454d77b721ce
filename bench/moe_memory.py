"""Per-rank memory of a Mixture-of-Experts model under expert parallelism, for bench/moe.py.

Every rank of a `world`-process gloo group (free port, one thread each) builds the engine as
`distrib train` does (`build_engine`, dp_shard = world, ep as asked), then counts the bytes it
holds locally (DTensor shards as their local part), split into routed experts and the rest:
  - parameters, after the build;
  - gradients, after one micro-batch's backward (FSDP has reduce-scattered them to shards);
  - AdamW state (both moments), after one full training step;
  - the expert weights a rank materializes to compute (read in a forward pre-hook on each
    layer's experts, after FSDP has gathered them): the experts this rank serves, whole.

Under FSDP every rank's resident share of the experts is 1/dp_shard whatever ep is: ep shards
the experts, FSDP the rest of the way (over dp_shard / ep). What ep divides is how many experts
a rank serves, hence the expert weights FSDP gathers for each MoE layer's compute (and the
all-gather traffic): 1/ep of them.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

# A tiny MoE model: 8 experts, so ep = 1, 2, 4 (and 8) divide them.
MODEL = [
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=128",
    "--model.vocab_size=512",
    "--model.max_seq_len=32",
    "--model.tie_embeddings=false",
    "--model.family=custom",
    "--model.moe_experts=8",
    "--model.moe_top_k=2",
    "--model.moe_ffn_dim=64",
    "--model.moe_kernel=loop",
    "--data.seq_len=32",
    "--training.micro_batch_size=1",
]
DESCRIPTION = "dim 64, 2 MoE layers of 8 experts (top 2, width 64), float32"
MB = 2**20
KINDS = ("params", "grads", "optimizer")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _split(pairs: list[tuple[nn.Parameter, torch.Tensor]], experts: set[int]) -> dict[str, int]:
    """Bytes of the tensors in (owning parameter, tensor) pairs, expert and dense apart."""
    out = {"expert": 0, "dense": 0}
    for param, t in pairs:
        out["expert" if id(param) in experts else "dense"] += _local_bytes(t)
    return out


def _watch_gathered(layers: list[nn.Module]) -> dict[str, Any]:
    """Record, per MoE layer, the experts and bytes its forward computes with (after FSDP's
    gather); returns the dict the hooks fill."""
    seen: dict[str, Any] = {"bytes": {}, "experts": 0}

    def hook(module: nn.Module, _inputs: Any, i: int) -> None:
        weights = [module.w1, module.w2, module.w3]
        seen["bytes"][i] = max(seen["bytes"].get(i, 0), sum(_local_bytes(w) for w in weights))
        w1 = module.w1.to_local() if isinstance(module.w1, DTensor) else module.w1
        seen["experts"] = w1.shape[0]

    for i, layer in enumerate(layers):
        layer.experts.register_forward_pre_hook(lambda m, a, i=i: hook(m, a, i))
    return seen


def measure_rank(flags: list[str]) -> dict[str, Any]:
    """Build this rank's engine from `flags`, take a backward, then a step; its byte counts."""
    from distrib.config import load_config
    from distrib.data.loader import Batch
    from distrib.engines.build import build_engine
    from distrib.models.moe import moe_layers
    from distrib.runtime import Runtime, detect_launch

    cfg = load_config(None, flags)
    engine, _, _ = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    layers = [layer for part in engine.parts for layer in moe_layers(part).values()]
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    params = [p for part in engine.parts for p in part.parameters()]
    gathered = _watch_gathered(layers)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1), generator=g)
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    engine._micro_step(batch, 1.0)  # noqa: SLF001 - one backward, to see the gradients
    grads = _split([(p, p.grad) for p in params if p.grad is not None], experts)
    for opt in engine.optimizers:
        opt.zero_grad(set_to_none=True)
    engine.train_step([batch])
    states = [
        (p, t)
        for opt in engine.optimizers
        for p, s in opt.state.items()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.ndim > 0
    ]
    return {
        "params": _split([(p, p) for p in params], experts),
        "grads": grads,
        "optimizer": _split(states, experts),
        "experts_served": gathered["experts"],
        "expert_gathered": sum(gathered["bytes"].values()),
        "expert_total": sum(p.numel() * p.element_size() for p in params if id(p) in experts),
    }


def _entry(rank: int, world: int, port: int, layouts: dict[int, list[str]], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # several processes share few cores
    # torch's notice about slicing flattened mesh dims, once per rank: noise in the table.
    warnings.filterwarnings("ignore", message="Slicing a flattened dim")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # One process group for every ep: each layout's engine is built on its own mesh.
        for ep, flags in layouts.items():
            record = {"rank": rank, **measure_rank(flags)}
            Path(out, f"ep{ep}-{rank}.json").write_text(json.dumps(record))
            dist.barrier()  # let in-flight collectives finish before the next layout
    finally:
        dist.destroy_process_group()


def layout_flags(
    eps: list[int], world: int, model: list[str] | None = None
) -> dict[int, list[str]]:
    """The config flags of each ep's layout; each is checked (ConfigError) before any spawn."""
    from distrib.config import load_config

    base = [*(MODEL if model is None else model), f"--training.global_batch_size={world}"]
    base.append(f"--parallel.dp_shard={world}")
    layouts = {ep: [*base, f"--parallel.ep={ep}"] for ep in eps}
    for flags in layouts.values():
        load_config(None, flags)
    return layouts


def measure(
    eps: list[int], world: int = 4, model: list[str] | None = None
) -> dict[int, list[dict[str, Any]]]:
    """Every rank's byte counts for dp_shard = `world` and each expert parallel degree in
    `eps`, all in one group of `world` processes (a process start costs more than a build)."""
    layouts = layout_flags(eps, world, model)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, _free_port(), layouts, tmp), nprocs=world, join=True)
        return {
            ep: [json.loads(Path(tmp, f"ep{ep}-{r}.json").read_text()) for r in range(world)]
            for ep in eps
        }


def summary(ep: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per ep: the largest rank's figures in MB (ranks differ by FSDP rounding only)."""
    row: dict[str, Any] = {"ep": ep, "experts_served": max(r["experts_served"] for r in ranks)}
    for kind in KINDS:
        for part in ("expert", "dense"):
            row[f"{kind}_{part}_mb"] = max(r[kind][part] for r in ranks) / MB
    row["expert_gathered_mb"] = max(r["expert_gathered"] for r in ranks) / MB
    row["expert_total_mb"] = ranks[0]["expert_total"] / MB
    return row


SCALED = {
    "experts_served": "experts/rank",
    "expert_gathered_mb": "gathered",
    "params_expert_mb": "resident expert params",
}


def scaling(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each ep's expert figures over the ep = 1 figures, and the 1/ep they are compared with."""
    base = next((r for r in rows if r["ep"] == 1), None)
    if base is None:
        return {}
    return {
        f"ep={r['ep']}": {"one_over_ep": 1 / r["ep"]}
        | {k: r[k] / base[k] if base[k] else None for k in SCALED}
        for r in rows
        if r["ep"] != 1
    }


def scaling_lines(scale: dict[str, dict[str, float | None]]) -> list[str]:
    """`ep=2 / ep=1 (1/ep = 0.50): experts/rank 0.50, ...`, one line per ep."""
    lines = []
    for key, ratio in scale.items():
        parts = [f"{name} {ratio[k]:.2f}" for k, name in SCALED.items() if ratio[k] is not None]
        lines.append(f"{key} / ep=1 (1/ep = {ratio['one_over_ep']:.2f}): " + ", ".join(parts))
    return lines


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The printed table: one line per ep."""
    head = ["ep", "experts/rank", "experts gathered MB", "params expert/dense MB"]
    out = [[*head, "grads expert/dense MB", "AdamW expert/dense MB"]]
    for r in rows:
        pair = [f"{r[f'{k}_expert_mb']:.3f} / {r[f'{k}_dense_mb']:.3f}" for k in KINDS]
        out.append(
            [str(r["ep"]), str(r["experts_served"]), f"{r['expert_gathered_mb']:.3f}", *pair]
        )
    return out
