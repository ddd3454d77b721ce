"""`distrib train` end to end on CPU: metrics, evaluation, exact resume, generation, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from distrib.cli import main
from distrib.parallel.activation import apply_ac
from distrib.train.metrics import flops_per_token
from tests.support.runs import records
from tests.support.tiny import tiny_config

from .conftest import train

pytestmark = pytest.mark.slow

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "memory_gb"}


def test_train_writes_metrics_eval_and_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--metrics.tensorboard=true") == 0
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert set(r) >= REQUIRED
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["memory_gb"] > 0
        assert r["mfu"] is None  # a CPU has no known peak
    assert {r["step"] for r in recs if "val_loss" in r} == {4, 8}
    assert recs[-1]["loss"] < recs[0]["loss"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000008"]
    assert (run / "config.json").is_file() and (run / "tokenizer.json").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= tags
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_mfu_uses_the_peak_override(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=2", "--metrics.peak_tflops=0.5") == 0
    rec = records(run)[-1]
    expected = rec["tokens_per_s"] * flops_per_token(tiny_config(), 64) / 1e12
    assert rec["tflops"] == pytest.approx(expected)
    assert rec["mfu"] == pytest.approx(expected / 0.5)


def test_stop_and_resume_is_bitwise_identical(data_dir: Path, tmp_path: Path) -> None:
    """Losses of a run stopped at step 3 and resumed equal an uninterrupted run's, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(data_dir, straight) == 0
    assert train(data_dir, split, "--training.stop_at_step=3") == 0
    assert [r["step"] for r in records(split)] == [1, 2, 3]
    assert train(data_dir, split) == 0  # checkpoint.resume = auto picks up step 3
    expected = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records(straight)]
    resumed = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records(split)]
    assert resumed == expected
    val = [(r["step"], r["val_loss"]) for r in records(straight) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in records(split) if "val_loss" in r]


def test_resume_never_starts_over(data_dir: Path, tmp_path: Path) -> None:
    """Starting over in a used folder takes job.overwrite; the old run's files move aside."""
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=2") == 0
    again = ["--training.steps=2", "--checkpoint.resume=never", "--job.overwrite=true"]
    assert train(data_dir, run, *again) == 0
    assert [r["step"] for r in records(run)] == [1, 2]
    (previous,) = (run / "previous").iterdir()
    assert [r["step"] for r in records(previous)] == [1, 2]


def test_grad_accumulation_matches_one_big_micro_batch(data_dir: Path, tmp_path: Path) -> None:
    """Two micro-batches of 4 take the same step as one of 8 (float32 sums differ in order)."""
    accum, whole = tmp_path / "accum", tmp_path / "whole"
    assert train(data_dir, accum, "--training.steps=4") == 0
    assert train(data_dir, whole, "--training.steps=4", "--training.micro_batch_size=8") == 0
    for a, b in zip(records(accum), records(whole), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_bfloat16_and_document_masking_train(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    extra = [
        "--training.steps=3",
        "--training.dtype=bfloat16",
        "--data.cross_document_attention=false",
    ]
    assert train(data_dir, run, *extra, "--model.attention=eager") == 0
    assert all(math.isfinite(r["loss"]) for r in records(run))
    sdpa = tmp_path / "sdpa"
    assert train(data_dir, sdpa, "--training.steps=3", "--data.cross_document_attention=false") == 0
    eager = tmp_path / "eager"
    masked = [
        "--training.steps=3",
        "--data.cross_document_attention=false",
        "--model.attention=eager",
    ]
    assert train(data_dir, eager, *masked) == 0
    for a, b in zip(records(sdpa), records(eager), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_generate_from_run(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=2") == 0
    capsys.readouterr()
    args = ["generate", "--run_dir", str(run), "--prompt", "def ", "--max_new_tokens", "12"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first) > len("def \n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert main([*args, "--temperature", "0", "--step", "2"]) == 0
    assert main([*args, "--step", "7"]) == 2
    assert "no checkpoint for step 7" in capsys.readouterr().err


def test_errors_before_any_work(data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--model.vocab_size=100") == 2
    err = capsys.readouterr().err
    vocab = tiny_config().vocab_size  # the test corpus's tokenizer has as many tokens
    assert f"model.vocab_size (100) is smaller than the tokenizer's vocabulary ({vocab})" in err
    assert train(tmp_path / "nowhere", run) == 2
    assert "distrib prepare" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train(data_dir, run) == 2
    assert "needs a world size of 1 (" in capsys.readouterr().err
    assert not run.exists()  # nothing was started or written


def test_activation_checkpointing_keeps_the_losses(data_dir: Path, tmp_path: Path) -> None:
    """Recomputing activations (all of them, or the cheap ones) changes memory, not math."""
    runs = {}
    for mode in ("none", "full", "selective"):
        run = tmp_path / mode
        assert (
            train(data_dir, run, "--training.steps=3", f"--parallel.activation_checkpoint={mode}")
            == 0
        )
        runs[mode] = [(r["loss"], r["grad_norm"]) for r in records(run)]
    for mode in ("full", "selective"):
        for (loss, norm), (ref_loss, ref_norm) in zip(runs[mode], runs["none"], strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-6)
            assert norm == pytest.approx(ref_norm, rel=1e-5)


def test_step_time_breakdown_and_tokens(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(data_dir, run, "--training.steps=4", "--checkpoint.interval=2") == 0
    recs = records(run)
    for r in recs:
        assert r["tokens"] == r["step"] * 8 * 64
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
        assert r["time_data_s"] >= 0 and r["time_forward_backward_s"] > 0
        assert r["time_optimizer_s"] > 0 and r["time_checkpoint_s"] >= 0
    assert recs[2]["time_checkpoint_s"] > 0  # the window after the step-2 save


def test_wandb_offline_run_without_leaking_the_key(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    overrides = [
        "--training.steps=3",
        "--metrics.wandb=true",
        "--metrics.wandb_run_name=offline-test",
    ]
    assert train(data_dir, run, *overrides) == 0
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    # The offline log is wandb's binary record stream; metric keys are stored as strings in it.
    data = offline[0].read_bytes()
    for key in (b"loss", b"grad_norm", b"tokens_per_s", b"offline-test"):
        assert key in data, key
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_compiled_blocks_train_like_eager(data_dir: Path, tmp_path: Path) -> None:
    """training.compile = true (inductor, per block) through the trainer: same losses, up to the
    float reassociation a fused kernel may do."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train(data_dir, eager, "--training.steps=3") == 0
    assert train(data_dir, compiled, "--training.steps=3", "--training.compile=true") == 0
    for a, b in zip(records(compiled), records(eager), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # The compiler's memory budget (what to recompute is its choice) changes memory, not math.
    budget = tmp_path / "memory_budget"
    ac = [
        "--parallel.activation_checkpoint=memory_budget",
        "--parallel.activation_memory_budget=0.3",
    ]
    try:
        assert train(data_dir, budget, "--training.steps=3", "--training.compile=true", *ac) == 0
    finally:
        apply_ac(nn.Module(), "none")  # torch's default budget again for the rest of the process
    for a, b in zip(records(budget), records(eager), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
