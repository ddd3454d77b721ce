"""Per-rank memory of each parallel layout: parameters, gradients, optimizer state and peak.

    python -m bench.memory                    # every layout that fits this machine's process count
    python -m bench.memory --layouts dp_shard=2 tp=2
    python -m bench.memory --layouts seq8192 seq8192,cp=2 seq8192,cp=4   # context parallelism

Each layout runs under `torchrun --standalone`; every rank builds the engine exactly as
`distrib train` does (`build_engine`), takes a micro-batch's backward to measure its gradients,
then two full optimizer steps, and reports the bytes it holds locally (DTensor shards counted as
their local part). Peak is CUDA's max allocated on a GPU, the process's peak RSS on a CPU (which
includes the Python and torch runtime, ~0.3-0.5 GB). Activations are the bytes one micro-batch's
forward leaves saved for backward on the rank (each storage once, parameters excluded; FSDP's
gathered weights are freed by then and count zero), on any device. Prints a table and writes
bench/results/memory-<device>-<date>.json.

The `seq8192` rows train the same model on one sequence of 8192 tokens per micro-batch, whole or
split over cp = 2 or 4 ranks by context parallelism: their activations should fall close to
1 / cp (every activation of a block is per token; ring attention saves only its rank's q, k, v,
output and log-sum-exp).

The `ds_*` layouts run the DeepSpeed engine (ZeRO stage 1, 2, 3, with CPU offload). There the
optimizer column counts DeepSpeed's float32 master partition and the AdamW moments (ZeRO keeps a
master copy even in float32), and gradients show as "-": DeepSpeed keeps them in its own flat
buckets and partitions, which the peak reflects. On a CPU "offloaded" state stays in the same
memory, so the offload rows only show the cost of the extra host copies; on a GPU they move the
optimizer (and, under ZeRO-3, parameter) bytes off the device. DeepSpeed's import adds to the
CPU peak (RSS) of its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bench.common import environment, table, write_result
from distrib.config import Config, load_config
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.runtime import Runtime, detect_launch, init_runtime, shutdown
from distrib.train.metrics import memory_gb

ROOT = Path(__file__).resolve().parents[1]

# The debug model's shapes, untied so every layout applies.
MODEL = [
    "--model.dim=256",
    "--model.n_layers=4",
    "--model.n_heads=8",
    "--model.n_kv_heads=4",
    "--model.ffn_dim=768",
    "--model.vocab_size=4096",
    "--model.max_seq_len=256",
    "--model.tie_embeddings=false",
    "--data.seq_len=256",
    "--training.global_batch_size=16",
    "--training.micro_batch_size=4",
]
LONG = [
    "--model.max_seq_len=8192",
    "--data.seq_len=8192",
    "--training.global_batch_size=2",
    "--training.micro_batch_size=1",
]
DS = ["--parallel.engine=deepspeed", "--parallel.dp_shard=-1"]
LAYOUTS = {
    "single": (1, []),
    "dp_replicate=2": (2, ["--parallel.dp_replicate=2"]),
    "dp_shard=2": (2, ["--parallel.dp_shard=2"]),
    "tp=2": (2, ["--parallel.tp=2"]),
    "pp=2": (2, ["--parallel.pp=2"]),
    "dp_shard=4": (4, ["--parallel.dp_shard=4"]),
    "dp_replicate=2,dp_shard=2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "dp_shard=2,tp=2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    "pp=2,dp_shard=2": (4, ["--parallel.pp=2", "--parallel.dp_shard=2"]),
    "cp=2": (2, ["--parallel.cp=2"]),
    "cp=2,dp_shard=2": (4, ["--parallel.cp=2", "--parallel.dp_shard=2"]),
    "seq8192": (1, LONG),
    "seq8192,cp=2": (2, [*LONG, "--parallel.cp=2"]),
    "seq8192,cp=4": (4, [*LONG, "--parallel.cp=4"]),
    "seq8192,cp=2,alltoall": (2, [*LONG, "--parallel.cp=2", "--parallel.cp_mode=alltoall"]),
    **{f"ds_zero{stage}": (2, [*DS, f"--parallel.zero_stage={stage}"]) for stage in (1, 2, 3)},
    "ds_zero2_offload": (2, [*DS, "--parallel.zero_stage=2", "--parallel.offload_optimizer=true"]),
    "ds_zero3_offload": (
        2,
        [
            *DS,
            "--parallel.zero_stage=3",
            "--parallel.offload_optimizer=true",
            "--parallel.offload_params=true",
        ],
    ),
}
MB = 2**20


def _bytes(tensors: list[torch.Tensor]) -> int:
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def activation_mb(engine: Any, batch: Batch) -> float | None:
    """MB that one forward of `batch` leaves saved for backward on this rank (each storage once,
    parameters excluded); then its backward, gradients dropped. None for pipelines, whose
    forward the schedule runs."""
    if engine.pipeline is not None:
        return None
    params = {
        (p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
        for part in engine.parts
        for p in part.parameters()
    }
    storages: dict[int, Any] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage
        return t

    for part in engine.parts:
        part.train()
    batch, positions = engine._sequence_share(batch)  # noqa: SLF001 - this rank's tokens
    with positions, engine.loss_context():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = engine._forward_loss(batch)  # noqa: SLF001
        # Measured after forward: FSDP has freed (resized to 0) the weights it gathered.
        held = sum(s.nbytes() for s in storages.values())
        loss.backward()
    for opt in engine.optimizers:
        opt.zero_grad(set_to_none=True)
    return held / MB


def _native(engine: Any, batch: Batch) -> dict[str, float | None]:
    params = [p for part in engine.parts for p in part.parameters()]
    activations = activation_mb(engine, batch)
    engine._micro_step(batch, 1.0)  # noqa: SLF001 - one backward, to see the gradients
    grads = _bytes([p.grad for p in params if p.grad is not None])
    for opt in engine.optimizers:
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        engine.train_step([batch, batch])
    states = [
        t
        for o in engine.optimizers
        for s in o.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.ndim > 0
    ]
    return {
        "params_mb": _bytes(params) / MB,
        "grads_mb": grads / MB,
        "optimizer_mb": _bytes(states) / MB,
        "activations_mb": activations,
    }


# Where DeepSpeed's optimizer wrappers keep the float32 master weights (ZeRO-3, ZeRO-1/2, bf16
# ZeRO-0); ZeRO-0 in float32 steps the model's own parameters.
_MASTER = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat")


def _deepspeed(engine: Any, batch: Batch) -> dict[str, float | None]:
    for _ in range(2):
        engine.train_step([batch, batch])
    # A ZeRO-3 parameter is an empty placeholder; its partition lives in ds_tensor.
    params = [getattr(p, "ds_tensor", p) for p in engine.model.parameters()]
    wrapper = engine.ds.optimizer
    master = next((list(getattr(wrapper, a)) for a in _MASTER if hasattr(wrapper, a)), [])
    moments = [
        t
        for s in engine.ds.basic_optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.ndim > 0
    ]
    return {
        "params_mb": _bytes(params) / MB,
        "grads_mb": None,
        "optimizer_mb": (_bytes(master) + _bytes(moments)) / MB,
        "activations_mb": None,
    }


def synthetic_batch(cfg: Config) -> Batch:
    """One micro-batch of uniform random tokens (seed 0) of the config's shape."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.training.micro_batch_size, cfg.data.seq_len + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    return Batch(tokens[:, :-1], tokens[:, 1:], None)


def measure(engine: Any, batch: Batch, device: torch.device) -> dict[str, float | None]:
    """This rank's parameter, gradient and optimizer bytes after two steps on `batch`, and
    its peak memory so far."""
    figures = _deepspeed(engine, batch) if hasattr(engine, "ds") else _native(engine, batch)
    return {**figures, "peak_mb": memory_gb(device) * 1024}


def write_ranks(record: dict[str, Any], runtime: Runtime, out: str) -> None:
    """Gather every rank's `record` to rank 0, which writes the list to `out` as JSON."""
    gathered = [None] * runtime.world_size if runtime.is_main else None
    if dist.is_initialized():
        dist.gather_object(record, gathered, dst=0)
    else:
        gathered = [record]
    if runtime.is_main:
        Path(out).write_text(json.dumps(gathered))
    runtime.barrier()  # finish in-flight collectives before the group is torn down


def worker(overrides: list[str], out: str) -> None:
    """One rank: build, measure, gather the ranks' figures to rank 0, which writes them."""
    runtime = init_runtime()
    try:
        cfg = load_config(None, [*MODEL, *overrides])
        engine, _, _ = build_engine(cfg, Runtime(detect_launch(), runtime.device))
        record = {"rank": runtime.rank, **measure(engine, synthetic_batch(cfg), runtime.device)}
        write_ranks(record, runtime, out)
    finally:
        shutdown()


def run_layout(
    name: str, nproc: int, overrides: list[str], module: str = "bench.memory"
) -> list[dict]:
    """Run `module`'s worker on `nproc` ranks (torchrun beyond one) in a temporary folder that
    holds its `--out` file; returns the ranks' records."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        args = ["-m", module, "--worker", "--out", str(out), "--", *overrides]
        launcher = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
            ]
            if nproc > 1
            else [sys.executable]
        )
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"layout {name} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker([a for a in rest if a != "--"], args.out)
        return
    header = ["layout", "rank", "params MB", "grads MB", "optim MB", "activations MB", "peak MB"]
    results, rows = {}, [header]
    for name in args.layouts:
        nproc, overrides = LAYOUTS[name]
        results[name] = run_layout(name, nproc, overrides)
        for r in results[name]:
            rows.append(
                [
                    name,
                    str(r["rank"]),
                    f"{r['params_mb']:.2f}",
                    "-" if r["grads_mb"] is None else f"{r['grads_mb']:.2f}",
                    f"{r['optimizer_mb']:.2f}",
                    "-" if r["activations_mb"] is None else f"{r['activations_mb']:.1f}",
                    f"{r['peak_mb']:.0f}",
                ]
            )
    print(table(rows))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = write_result(
        "memory", device, {"environment": environment(device), "model": MODEL, "layouts": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
