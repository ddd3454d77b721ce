"""Supervised fine-tuning and DPO in parallel layouts and on both engines match one process.

SFT differs from pretraining in its labels (prompt tokens carry no loss) and in its loss's
denominator: the supervised-token count of the whole global batch, which every micro-batch
carries (`Batch.loss_denominator`). A layout that averaged per micro-batch, per rank or per
pipeline micro-batch instead would weigh tokens differently and drift from one process; so each
layout runs the real command line under torchrun (gloo, 2 processes) on the standard library's
instruction pairs and must give the single-process losses (rtol 1e-5) and, at step 1, its
gradient norm (rtol 1e-6, the norm being global across every axis).

Packed examples (attention kept within each example) run under FSDP and TP; pipeline stages do
not carry document ids, so pp runs padded examples, compared with a padded single-process run,
as does the DeepSpeed engine.

DPO runs in data-parallel layouts (FSDP, DDP, DeepSpeed ZeRO-2) from a tiny pretrained run: the
reference pass, split over the ranks, must give one process's table, and the steps its losses
and rewards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from distrib.cli import main
from tests.support.runs import records, run_train
from tests.support.tiny import tiny_flags

pytestmark = pytest.mark.slow

SEQ = 128
MODEL = tiny_flags(max_seq_len=SEQ)
SFT = ["--data.format=chat", "--training.objective=sft"]
RUN = [
    *MODEL,
    *SFT,
    f"--data.seq_len={SEQ}",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    "--training.steps=5",
    "--training.warmup_steps=1",
    "--training.eval_every=0",
    "--metrics.log_every=1",
    "--metrics.progress=false",
    "--checkpoint.interval=0",
]
LOSS_RTOL, FIRST_GRAD_NORM_RTOL = 1e-5, 1e-6
REWARD_ATOL = 1e-5

LAYOUTS = {
    "pack": {
        "fsdp": ["--parallel.dp_shard=2"],
        "tp": ["--parallel.tp=2"],
    },
    "pad": {
        "pp": ["--parallel.pp=2"],
        "deepspeed_zero2": [
            "--parallel.engine=deepspeed",
            "--parallel.zero_stage=2",
            "--parallel.dp_shard=2",
        ],
    },
}


@pytest.fixture(scope="module")
def sft_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Instruction pairs from the standard library, tokenized as the text corpus was."""
    out = tmp_path_factory.mktemp("sft") / "data"
    args = ["prepare", f"--data.dir={out}", f"--data.tokenizer={data_dir / 'tokenizer.json'}"]
    assert (
        main(
            [
                *args,
                *MODEL,
                *SFT,
                f"--data.seq_len={SEQ}",
                "--data.max_documents=300",
                "--data.val_fraction=0.2",
            ]
        )
        == 0
    )
    return out


def _run(data: Path, run_dir: Path, nproc: int, args: list[str]) -> list[dict]:
    run_train(nproc, [*RUN, f"--data.dir={data}", f"--job.run_dir={run_dir}", *args])
    return records(run_dir)


@pytest.mark.parametrize("packing", sorted(LAYOUTS))
def test_sft_layouts_match_one_process(sft_data: Path, tmp_path: Path, packing: str) -> None:
    mode = [f"--data.packing={packing}"]
    want = _run(sft_data, tmp_path / "single", 1, mode)
    assert len(want) == 5 and all(r["target_tokens"] > 0 for r in want)
    for name, layout in LAYOUTS[packing].items():
        got = _run(sft_data, tmp_path / name, 2, [*mode, *layout])
        assert [r["step"] for r in got] == [r["step"] for r in want], name
        for g, w in zip(got, want, strict=True):
            assert g["target_tokens"] == w["target_tokens"], name
            assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL), f"{name} step {g['step']}"
        first = got[0]["grad_norm"]
        assert first == pytest.approx(want[0]["grad_norm"], rel=FIRST_GRAD_NORM_RTOL), name


DPO_LAYOUTS = {
    "fsdp": ["--parallel.dp_shard=2"],
    "ddp": ["--parallel.dp_replicate=2"],
    "deepspeed_zero2": [
        "--parallel.engine=deepspeed",
        "--parallel.zero_stage=2",
        "--parallel.dp_shard=2",
    ],
}


@pytest.fixture(scope="module")
def dpo_setup(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny pretrained run to start from, and preference pairs tokenized as it was."""
    root = tmp_path_factory.mktemp("dpo")
    base = root / "base"
    args = ["train", f"--data.dir={data_dir}", f"--job.run_dir={base}", *MODEL]
    steps = ["--training.steps=4", "--training.eval_every=0", "--metrics.progress=false"]
    assert main([*args, "--data.seq_len=64", *steps]) == 0
    data = root / "data"
    prep = ["prepare", f"--data.dir={data}", "--data.format=preference"]
    prep += ["--training.objective=dpo", f"--model.init_from=run:{base}", f"--data.seq_len={SEQ}"]
    more = ["--data.max_documents=300", "--data.val_fraction=0.2"]
    assert main([*prep, f"--model.max_seq_len={SEQ}", *more]) == 0
    return base, data


def test_dpo_data_parallel_layouts_match_one_process(
    dpo_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """The reference pass (each rank its share of the pairs, then one all-reduce) and the DPO
    steps under FSDP, DDP and DeepSpeed give one process's reference table, losses and rewards."""
    import numpy as np

    base, data = dpo_setup
    dpo = [
        f"--model.init_from=run:{base}",
        f"--model.max_seq_len={SEQ}",
        "--data.format=preference",
        "--training.objective=dpo",
        f"--data.seq_len={SEQ}",
        "--training.global_batch_size=4",
        "--training.micro_batch_size=1",
        "--training.steps=4",
        "--training.lr=1e-3",
        "--training.warmup_steps=1",
        "--training.eval_every=0",
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--checkpoint.interval=0",
    ]

    def run(name: str, nproc: int, layout: list[str]) -> list[dict]:
        run_train(nproc, [*dpo, f"--data.dir={data}", f"--job.run_dir={tmp_path / name}", *layout])
        return records(tmp_path / name)

    want = run("single", 1, [])
    table = np.load(tmp_path / "single" / "reference_logps.npz")
    for name, layout in DPO_LAYOUTS.items():
        got = run(name, 2, layout)
        with np.load(tmp_path / name / "reference_logps.npz") as theirs:
            for split in ("train", "val"):
                np.testing.assert_allclose(theirs[split], table[split], rtol=1e-6, err_msg=name)
        for g, w in zip(got, want, strict=True):
            where = f"{name} step {g['step']}"
            assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL), where
            # Rewards are beta x differences of log-probabilities summed over whole responses
            # (hundreds in size): float32 rounding there is ~1e-5 absolute, whatever the reward.
            for key in ("reward_margin", "rewards_chosen", "rewards_rejected"):
                assert g[key] == pytest.approx(w[key], abs=REWARD_ATOL), f"{where}: {key}"
            assert g["reward_accuracy"] == w["reward_accuracy"], where
