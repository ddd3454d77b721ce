"""Every parallel layout trains the debug-shaped model to the losses of one process.

Each layout runs the real command line under `torchrun --standalone` (real processes, gloo, a
free port) for 8 steps in float32 with the same seed and data; its per-step loss and gradient
norm must match the single-process run.

Tolerances. The loss: rtol 1e-5 for every layout (measured: below 2e-7). The gradient norm at
step 1, before any update: rtol 1e-6 for every layout, which checks that the norm really is global
across data, tensor and pipeline axes. The gradient norm after updates: rtol 1e-5 for pure data
parallelism (measured: below 3e-7), 1e-3 for layouts with tensor or pipeline parallelism. Those
split matrix products and sums into other orders, so float32 rounding differs in the last bits;
AdamW then turns the rounding noise of near-zero gradients into lr-sized steps (m / sqrt(v)), and
the norm, a sum over every gradient, shows it first: measured for tp=2 on a dim-64 model, 6e-6 at
step 3 growing to 4e-4 at step 8, while the loss still agreed to 1e-7 (on the tiny model of
tests/support: below 5e-7 at every step, for every layout).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runs import records, run_train
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow

RUN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=4",
    "--training.steps=8",
    "--training.warmup_steps=2",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
]
LOSS_RTOL, FIRST_GRAD_NORM_RTOL = 1e-5, 1e-6
DP_GRAD_NORM_RTOL, SPLIT_MATH_GRAD_NORM_RTOL = 1e-5, 1e-3

WORLD_2 = {
    "dp_shard": ["--parallel.dp_shard=2"],
    "dp_replicate": ["--parallel.dp_replicate=2"],
    "tp": ["--parallel.tp=2"],
    "tp_no_loss_parallel": ["--parallel.tp=2", "--parallel.loss_parallel=false"],
    "pp_gpipe": ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"],
    "pp_split_points": ["--parallel.pp=2", "--parallel.pp_split_points=1"],  # 1 + 3 layers
    "pp_1f1b": ["--parallel.pp=2", "--parallel.pp_schedule=1f1b"],
    "pp_interleaved_1f1b": [
        "--parallel.pp=2",
        "--parallel.pp_schedule=interleaved_1f1b",
        "--parallel.pp_stages_per_rank=2",
    ],
    "pp_zero_bubble": [
        "--parallel.pp=2",
        "--parallel.pp_schedule=zero_bubble",
        "--parallel.pp_stages_per_rank=2",
    ],
    "dp_shard_ac_full": ["--parallel.dp_shard=2", "--parallel.activation_checkpoint=full"],
    # Two micro-batches per step on each rank: gradients reduced once, after the second.
    "dp_shard_accum": ["--parallel.dp_shard=2", "--training.micro_batch_size=2"],
    "dp_replicate_accum": ["--parallel.dp_replicate=2", "--training.micro_batch_size=2"],
}
WORLD_4 = {
    "hsdp": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--training.micro_batch_size=2"],
    "dp_shard_tp": ["--parallel.dp_shard=2", "--parallel.tp=2"],
    "pp_dp_shard": ["--parallel.pp=2", "--parallel.dp_shard=2"],
    "pp_dp_replicate": ["--parallel.pp=2", "--parallel.dp_replicate=2"],
    "pp_tp": ["--parallel.pp=2", "--parallel.tp=2"],
    "pp_interleaved_dp_shard": [
        "--parallel.pp=2",
        "--parallel.dp_shard=2",
        "--parallel.pp_schedule=interleaved_1f1b",
        "--parallel.pp_stages_per_rank=2",
    ],
}


def _run(data_dir: Path, run_dir: Path, nproc: int, layout: list[str]) -> list[dict]:
    run_train(nproc, [f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *RUN, *layout])
    return records(run_dir)


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run(data_dir, tmp_path_factory.mktemp("ref"), 1, [])


def _assert_parity(
    records: list[dict], reference: list[dict], layout: list[str], nproc: int
) -> None:
    splits_math = any(arg.startswith(("--parallel.tp", "--parallel.pp")) for arg in layout)
    grad_rtol = SPLIT_MATH_GRAD_NORM_RTOL if splits_math else DP_GRAD_NORM_RTOL
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    assert records[0]["grad_norm"] == pytest.approx(
        reference[0]["grad_norm"], rel=FIRST_GRAD_NORM_RTOL
    )
    for got, want in zip(records, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=grad_rtol), got["step"]
        assert got["lr"] == want["lr"]
        # Tokens are counted once however the layout splits them; per-device rates divide by all.
        assert got["tokens"] == want["tokens"] == got["step"] * 8 * 64
        assert got["tokens_per_s"] > 0
        assert got["tokens_per_s_per_device"] == pytest.approx(got["tokens_per_s"] / nproc)


@pytest.mark.parametrize("name", list(WORLD_2))
def test_world_2(name: str, data_dir: Path, tmp_path: Path, reference: list[dict]) -> None:
    _assert_parity(_run(data_dir, tmp_path, 2, WORLD_2[name]), reference, WORLD_2[name], 2)


@pytest.mark.parametrize("name", list(WORLD_4))
def test_world_4(name: str, data_dir: Path, tmp_path: Path, reference: list[dict]) -> None:
    _assert_parity(_run(data_dir, tmp_path, 4, WORLD_4[name]), reference, WORLD_4[name], 4)


@pytest.mark.parametrize(
    ("name", "nproc", "layout"),
    [
        ("dp_shard_tp", 4, WORLD_4["dp_shard_tp"]),
        ("pp_interleaved_1f1b", 2, WORLD_2["pp_interleaved_1f1b"]),
        ("dp_replicate", 2, WORLD_2["dp_replicate"]),
    ],
)
def test_stop_and_resume_under_layout(
    name: str, nproc: int, layout: list[str], data_dir: Path, tmp_path: Path, reference
) -> None:
    """Save, stop at step 3, resume under the same layout: the losses of an unbroken run."""
    layout = [*layout, "--checkpoint.interval=3"]
    _run(data_dir, tmp_path, nproc, [*layout, "--training.stop_at_step=3"])
    _assert_parity(_run(data_dir, tmp_path, nproc, layout), reference, layout, nproc)


def test_fsdp_bfloat16_mixed_precision(data_dir: Path, tmp_path: Path, reference) -> None:
    """bf16 parameters in compute with float32 master weights and reductions: it trains, close
    to the float32 run (bfloat16 keeps ~3 significant digits, so not bit for bit)."""
    records = _run(data_dir, tmp_path, 2, ["--parallel.dp_shard=2", "--training.dtype=bfloat16"])
    for got, want in zip(records, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
    assert records[-1]["loss"] < records[0]["loss"]
