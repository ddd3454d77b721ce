"""Expert parallelism trains a Mixture-of-Experts model to the losses of one process, alone and
combined with FSDP, HSDP, tensor and pipeline parallelism; checkpoints reshard across ep degrees;
each rank holds 1/ep of the experts.

The model is the tiny one with 4 experts, top-2, one leading dense block, shared-expert-free,
with the router z-loss and DeepSeek-V3 bias balancing on: both are layout-invariant (the z-loss
is a mean over tokens; the balancing sees counts summed over all ranks), so every layout must
follow the same trajectory. The Switch load-balancing loss is left off here: it is computed per
micro-batch on each rank (as in Megatron-Core), which is a different objective for each way of
cutting the batch; tests/unit/test_moe.py checks its gradient.

Tolerances (as tests/distributed/test_parity.py): losses rtol 1e-5 at every step (measured:
below 2e-6); gradient norms rtol 1e-5 for data and expert parallel layouts, 1e-3 where tensor
or pipeline parallelism splits the math (measured: below 2e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from distrib.config import load_config
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.models.moe import moe_layers
from distrib.runtime import Runtime, detect_launch
from tests.support.runs import records, run_train
from tests.support.tiny import tiny_flags

from .harness import spawn

pytestmark = pytest.mark.slow

MOE = [
    *tiny_flags(
        family="custom",
        moe_experts=4,
        moe_top_k=2,
        moe_ffn_dim=32,
        moe_dense_layers=1,
        moe_z_loss_coef=0.001,
        moe_bias_update_rate=0.001,
    ),
]
RUN = [
    *MOE,
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    "--training.steps=6",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
]
LOSS_RTOL, GRAD_NORM_RTOL, SPLIT_MATH_GRAD_NORM_RTOL = 1e-5, 1e-5, 1e-3

LAYOUTS = {
    "ep2": (2, ["--parallel.dp_shard=2", "--parallel.ep=2"]),
    "ep4": (4, ["--parallel.dp_shard=4", "--parallel.ep=4"]),
    "ep2_fsdp4": (4, ["--parallel.dp_shard=4", "--parallel.ep=2"]),
    "ep2_hsdp": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.ep=2"]),
    "ep2_tp2": (4, ["--parallel.dp_shard=2", "--parallel.ep=2", "--parallel.tp=2"]),
    "ep2_pp2": (4, ["--parallel.dp_shard=2", "--parallel.ep=2", "--parallel.pp=2"]),
}


def _run(data_dir: Path, run_dir: Path, nproc: int, layout: list[str]) -> list[dict]:
    run_train(nproc, [f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *RUN, *layout])
    return records(run_dir)


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run(data_dir, tmp_path_factory.mktemp("ref"), 1, [])


def _assert_parity(got: list[dict], want: list[dict], layout: list[str]) -> None:
    splits_math = any(arg.startswith(("--parallel.tp", "--parallel.pp")) for arg in layout)
    grad_rtol = SPLIT_MATH_GRAD_NORM_RTOL if splits_math else GRAD_NORM_RTOL
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=grad_rtol), g["step"]
        # The same routing everywhere: per-layer imbalance from counts summed over all ranks.
        assert g["moe_imbalance"] == pytest.approx(w["moe_imbalance"], rel=1e-3), g["step"]
        assert g["moe_z_loss"] == pytest.approx(w["moe_z_loss"], rel=1e-4), g["step"]


def test_reference_logs_moe_metrics(reference: list[dict]) -> None:
    for row in reference:
        assert row["moe_layers"] == [1, 2, 3]  # block 0 is dense
        assert len(row["moe_imbalance"]) == len(row["moe_aux_loss"]) == 3
        assert all(v >= 1.0 for v in row["moe_imbalance"])
        assert row["moe_imbalance_max"] == max(row["moe_imbalance"])
        assert all(v > 0 for v in row["moe_z_loss"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(
    name: str, data_dir: Path, tmp_path: Path, reference: list[dict]
) -> None:
    nproc, layout = LAYOUTS[name]
    _assert_parity(_run(data_dir, tmp_path, nproc, layout), reference, layout)


def test_resume_with_another_ep_degree(
    data_dir: Path, tmp_path: Path, reference: list[dict]
) -> None:
    """Saved under ep = 2 on 2 ranks, resumed under ep = 4 on 4: the unbroken run's losses
    (the experts and the balancing bias are resharded by the checkpoint)."""
    first = ["--parallel.dp_shard=2", "--parallel.ep=2", "--checkpoint.interval=3"]
    _run(data_dir, tmp_path, 2, [*first, "--training.stop_at_step=3"])
    second = ["--parallel.dp_shard=4", "--parallel.ep=4", "--checkpoint.interval=3"]
    _assert_parity(_run(data_dir, tmp_path, 4, second), reference, second)


def _local(t: torch.Tensor) -> int:
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def _count(rank: int, world_size: int, ep: int, out: str) -> None:
    args = [*MOE, "--data.seq_len=32", "--training.global_batch_size=4"]
    args += ["--training.micro_batch_size=1", f"--parallel.dp_shard={world_size}"]
    cfg = load_config(None, [*args, f"--parallel.ep={ep}"])
    engine, _, _ = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 33), generator=torch.Generator())
    engine.train_step([Batch(tokens[:, :-1], tokens[:, 1:], None)])
    experts = [p for layer in moe_layers(engine.model).values() for p in layer.experts.parameters()]
    record = {
        "full": sum(p.numel() for p in experts),
        "local": sum(_local(p) for p in experts),
        "state": sum(
            _local(t)
            for p in experts
            for t in engine.optimizers[0].state[p].values()
            if isinstance(t, torch.Tensor) and t.ndim > 0
        ),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize(("world", "ep", "share"), [(2, 2, 2), (4, 4, 4), (4, 2, 4)])
def test_each_rank_holds_its_share_of_the_experts(
    world: int, ep: int, share: int, tmp_path: Path
) -> None:
    """A rank holds 1/ep of the expert weights and of their AdamW moments; with
    dp_shard = 4 and ep = 2, FSDP halves that again (1/4)."""
    spawn(_count, world, ep, str(tmp_path))
    for rank in range(world):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["local"] * share == got["full"]
        assert got["state"] * share == 2 * got["full"]  # exp_avg and exp_avg_sq
