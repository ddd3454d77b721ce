"""The DeepSpeed engine trains to the native engine's losses, partitions as ZeRO says, and resumes
exactly.

Each run is the real command line under `torchrun --standalone` (two processes, gloo, DeepSpeed's
CPU accelerator) for 6 steps of a tiny model in float32 with two micro-batches per rank per step,
compared with the single-process native run and the native dp_shard=2 (FSDP2) run.

Tolerances. float32, ZeRO 0-3 with and without CPU offload: loss and gradient norm rtol 1e-5
(measured: loss below 2e-7, norm below 3e-7), the same gate as the native layouts'
(test_parity.py). Same initial values, data, AdamW and schedule; what differs is the order of the
floating-point sums (DeepSpeed reduces flat, bucketed gradients and averages them its own way; its
CPU Adam for offload is a C++ AdamW), so results agree to the last bits, which AdamW then carries
forward. bfloat16: loss rtol 1e-3, norm rtol 2e-2 (measured: 2e-5 and 8e-3). DeepSpeed keeps the
weights in bfloat16 (float32 master copies in the optimizer) and runs the whole model in it,
while the native single process autocasts matrix products over float32 weights, so rounding
differs from the first step. Checkpoint resume: equal to the bit (measured).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "deepspeed",
    reason="parallel.engine = 'deepspeed' needs the deepspeed package (pip install -e '.[dev]')",
)

from distrib.checkpoint.deepspeed import consolidated_weights  # noqa: E402
from distrib.config import load_config  # noqa: E402
from distrib.data.loader import Batch  # noqa: E402
from distrib.engines.build import build_engine  # noqa: E402
from distrib.models.transformer import Transformer  # noqa: E402
from distrib.runtime import Runtime, detect_launch  # noqa: E402
from tests.support.runs import records, run_train  # noqa: E402
from tests.support.tiny import tiny_flags  # noqa: E402

from .harness import spawn  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 6
RUN = [
    *tiny_flags(),
    "--data.seq_len=64",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",  # two micro-batches per rank and step at world size 2
    f"--training.steps={STEPS}",
    "--training.warmup_steps=2",
    "--training.eval_every=3",
    "--training.eval_steps=1",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
]
DS = ["--parallel.engine=deepspeed", "--parallel.dp_shard=-1"]
BF16 = ["--training.dtype=bfloat16"]
NAN = [
    "--debug.nan_at_step=3",
    "--debug.nan_rank=1",
    "--training.on_nonfinite=rollback",
    "--checkpoint.interval=2",
]

# name: (processes, overrides); run once per module and shared by the tests that compare them.
RUNS: dict[str, tuple[int, list[str]]] = {
    "native": (1, []),
    "native_dp_shard": (2, ["--parallel.dp_shard=2"]),
    **{f"zero{s}": (2, [*DS, f"--parallel.zero_stage={s}"]) for s in range(4)},
    "zero2_offload": (2, [*DS, "--parallel.zero_stage=2", "--parallel.offload_optimizer=true"]),
    "zero3_offload": (
        2,
        [
            *DS,
            "--parallel.zero_stage=3",
            "--parallel.offload_optimizer=true",
            "--parallel.offload_params=true",
        ],
    ),
    "native_bf16": (1, BF16),
    "zero0_bf16": (2, [*DS, "--parallel.zero_stage=0", *BF16]),
    "zero3_bf16": (2, [*DS, "--parallel.zero_stage=3", *BF16]),
    "native_dp_shard_nan": (2, ["--parallel.dp_shard=2", *NAN]),
    "zero3_nan": (2, [*DS, "--parallel.zero_stage=3", *NAN]),
}
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 1e-5
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 1e-3, 2e-2


def train(data_dir: Path, run_dir: Path, nproc: int, overrides: list[str]) -> None:
    """`distrib train` on `nproc` processes, into `run_dir`."""
    run_train(nproc, [f"--data.dir={data_dir}", f"--job.run_dir={run_dir}", *RUN, *overrides])


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The run folder of RUNS[name], trained on first use."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            run_dir = tmp_path_factory.mktemp(name)
            train(data_dir, run_dir, *RUNS[name])
            done[name] = run_dir
        return done[name]

    return get


def assert_match(got: list[dict], want: list[dict], loss_rtol: float, norm_rtol: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want, strict=True):
        step = g["step"]
        assert g.get("skipped", False) == w.get("skipped", False), step
        assert g["lr"] == w["lr"], step  # the schedule advances on skipped steps too
        if w.get("skipped"):
            continue  # NaN on purpose (logged as null)
        assert g["loss"] == pytest.approx(w["loss"], rel=loss_rtol), step
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=norm_rtol), step
        if "val_loss" in w:
            assert g["val_loss"] == pytest.approx(w["val_loss"], rel=loss_rtol), step


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_native(stage: int, runs: Callable[[str], Path]) -> None:
    got = records(runs(f"zero{stage}"))
    assert_match(got, records(runs("native")), LOSS_RTOL, GRAD_NORM_RTOL)
    assert_match(got, records(runs("native_dp_shard")), LOSS_RTOL, GRAD_NORM_RTOL)
    assert all(math.isfinite(r["loss"]) for r in got)


@pytest.mark.parametrize("name", ["zero2_offload", "zero3_offload"])
def test_cpu_offload_matches_native(name: str, runs: Callable[[str], Path]) -> None:
    assert_match(records(runs(name)), records(runs("native")), LOSS_RTOL, GRAD_NORM_RTOL)


@pytest.mark.parametrize("name", ["zero0_bf16", "zero3_bf16"])
def test_bfloat16_matches_native(name: str, runs: Callable[[str], Path]) -> None:
    # ZeRO-0 in bf16 is DeepSpeed's fp16-style wrapper, which steps AdamW once at start-up with
    # zero gradients; unless that step is held back, the loss drifts 5e-3 away by step 6.
    want = records(runs("native_bf16"))
    assert_match(records(runs(name)), want, BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL)


def test_nan_rolls_back_like_native(runs: Callable[[str], Path]) -> None:
    """Rank 1's loss is NaN at step 3: DeepSpeed finds the norm non-finite and skips the update
    (and its LR step, which the engine makes up), the guard rolls back to step 2's checkpoint
    (a DeepSpeed load in a live run) and step 3's batch is passed over. The losses after it match
    the native engine's only if nothing of the refused step stayed behind."""
    got = records(runs("zero3_nan"))
    assert [r["step"] for r in got if r.get("skipped")] == [3]
    assert_match(got, records(runs("native_dp_shard_nan")), LOSS_RTOL, GRAD_NORM_RTOL)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_exact(
    stage: int, data_dir: Path, tmp_path: Path, runs: Callable[[str], Path]
) -> None:
    nproc, overrides = RUNS[f"zero{stage}"]
    train(data_dir, tmp_path, nproc, [*overrides, "--training.stop_at_step=3"])
    saved = tmp_path / "checkpoints" / "step-00000003"
    assert (saved / "deepspeed").is_dir()
    assert {p.name for p in saved.glob("distrib_rank*.pt")} == {
        "distrib_rank0.pt",
        "distrib_rank1.pt",
    }
    train(data_dir, tmp_path, nproc, overrides)  # checkpoint.resume = auto
    resumed = records(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    whole = records(runs(f"zero{stage}"))
    for got, want in zip(resumed, whole, strict=True):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            assert got.get(key) == want.get(key), (got["step"], key)


def test_consolidated_weights_agree_across_stages(runs: Callable[[str], Path]) -> None:
    """The final checkpoints of ZeRO-0 (whole module), ZeRO-2 and ZeRO-3 (partitions gathered
    offline) hold the same model, keyed as the bare model names its parameters."""
    final = f"checkpoints/step-{STEPS:08d}"
    weights = [consolidated_weights(runs(f"zero{s}") / final) for s in (0, 2, 3)]
    cfg = load_config(None, RUN)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg.model).named_parameters()}
    for w in weights:
        assert {k: v.shape for k, v in w.items()} == shapes
        for key in shapes:
            # 1% of one AdamW step (lr 3e-3): rounding noise in a near-zero gradient can turn
            # into a visible step in a single element (measured: 2e-6 in two of 2048).
            torch.testing.assert_close(w[key], weights[0][key], rtol=0, atol=3e-5)


def test_generate_reads_deepspeed_checkpoints(runs: Callable[[str], Path]) -> None:
    """`distrib generate` (and so `distrib export`) loads a ZeRO-3 run's gathered weights."""
    from distrib.checkpoint.run import load_run

    run = runs("zero3")
    model, _, _ = load_run(run, None, torch.device("cpu"))
    want = consolidated_weights(run / f"checkpoints/step-{STEPS:08d}")
    for name, param in model.named_parameters():
        assert torch.equal(param, want[name]), name


def _partitions(rank: int, world_size: int, out: str, stage: int) -> None:
    """Build a ZeRO engine, refuse one update, accept the next; record sizes and what moved."""
    overrides = [
        "--data.seq_len=32",
        "--training.global_batch_size=2",
        "--training.micro_batch_size=1",
    ]
    cfg = load_config(None, [*tiny_flags(), *overrides, *DS, f"--parallel.zero_stage={stage}"])
    engine, _, dp_size = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    params = list(engine.model.parameters())

    def local() -> list[torch.Tensor]:  # this rank's share: a ZeRO-3 partition, else the whole
        return [getattr(p, "ds_tensor", p).detach().clone() for p in params]

    shape = (1, cfg.data.seq_len + 1)
    tokens = torch.randint(
        0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(rank)
    )
    batches = [Batch(tokens[:, :-1], tokens[:, 1:], None)]
    base = engine.ds.optimizer.optimizer  # torch's AdamW inside DeepSpeed's ZeRO wrapper
    before, lr = local(), engine.lr()
    refused = engine.train_step(batches, accept=lambda loss, norm: False)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, local(), strict=True))
    record = {
        "refused": {
            "skipped": refused.skipped,
            "params_unchanged": unchanged,
            # AdamW fills its state on its first update (DeepSpeed may add empty entries).
            "optimizer_state": sum(1 for state in base.state.values() if state),
            "lr_moved": engine.lr() != lr,
        }
    }
    accepted = engine.train_step(batches)
    moments = [s["exp_avg"] for s in base.state.values() if s]
    record.update(
        accepted_skipped=accepted.skipped,
        adam_steps=sorted({int(s["step"]) for s in base.state.values() if s}),
        dp_size=dp_size,
        # A ZeRO-3 parameter keeps its full size in ds_numel and its partition in ds_tensor.
        full=sum(getattr(p, "ds_numel", p.numel()) for p in params),
        local=sum(t.numel() for t in local()),
        moments=sum(m.numel() for m in moments),
    )
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    # DeepSpeed's teardown (ZeRO-3 hooks and parameter coordinator) while the group still exists;
    # once, without it, a rank aborted at exit ("terminate called without an active exception").
    engine.ds.destroy()


@pytest.mark.parametrize("stage", [2, 3])
def test_partitions_and_refused_updates(stage: int, tmp_path: Path) -> None:
    """Optimizer state is 1/N of the model on each rank at every stage, parameters too under
    ZeRO-3; a refused update leaves parameters and AdamW untouched while the LR schedule moves."""
    spawn(_partitions, 2, str(tmp_path), stage)
    counts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    full = counts[0]["full"]
    # Partitions are padded to equal sizes: at most one element per parameter tensor (ZeRO-3)
    # or an alignment of a few elements per flat group (ZeRO-1/2).
    slack = 64
    for c in counts:
        assert c["refused"] == {
            "skipped": True,
            "params_unchanged": True,
            "optimizer_state": 0,
            "lr_moved": True,
        }
        assert not c["accepted_skipped"] and c["adam_steps"] == [1]
        assert c["dp_size"] == 2
        assert full / 2 <= c["moments"] <= full / 2 + slack
        if stage == 3:
            assert full / 2 <= c["local"] <= full / 2 + slack
        else:
            assert c["local"] == full  # ZeRO-1/2 keep whole parameters on every rank
