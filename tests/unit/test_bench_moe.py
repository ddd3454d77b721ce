"""bench.moe: the dense twin's active parameters, the contenders, a one-step rehearsal, and the
per-rank memory measurement under expert parallelism (world 2, ep 1 vs 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import moe, moe_figures, moe_memory
from distrib.config import Config, load_config
from distrib.errors import ConfigError
from distrib.train.metrics import active_matmul_params

TINY = [
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.vocab_size=256",
    "--model.max_seq_len=32",
    "--data.seq_len=32",
    "--model.moe_experts=4",
    "--model.moe_ffn_dim=16",
]


def _moe(*flags: str) -> Config:
    return load_config(None, [*moe.PRESETS["cpu"], *TINY, *flags])


@pytest.mark.parametrize("shared", [0, 1])
def test_dense_twin_has_the_moe_models_active_weights_but_the_routers(shared: int) -> None:
    cfg = _moe(f"--model.moe_shared_experts={shared}", "--model.moe_top_k=2")
    twin = load_config(None, [*moe.PRESETS["cpu"], *TINY, *moe.dense_twin_flags(cfg.model)])
    assert twin.model.moe_experts == 0
    assert twin.model.ffn_dim == (2 + shared) * 16
    counts = moe.active_params(cfg.model, twin.model)
    assert counts["router"] == 2 * 32 * 4  # 2 MoE layers of a [4, 32] router
    assert counts["matched"]
    assert counts["dense"] == active_matmul_params(twin.model) == counts["moe"] - counts["router"]


def test_dense_twin_refuses_leading_dense_blocks_of_another_width() -> None:
    cfg = _moe("--model.moe_dense_layers=1", "--model.ffn_dim=64")
    with pytest.raises(ConfigError, match="model.ffn_dim=32"):
        moe.dense_twin_flags(cfg.model)
    fits = _moe("--model.moe_dense_layers=1", "--model.ffn_dim=32")
    assert moe.dense_twin_flags(fits.model) == ["--model.moe_experts=0", "--model.ffn_dim=32"]


def test_contenders_skip_grouped_mm_without_a_hopper_gpu() -> None:
    args, overrides = moe.parse_args(["--preset", "cpu", *TINY])
    names = {c.name: c for c in moe.build_contenders(args, overrides)}
    assert list(names) == ["moe_grouped_mm", "moe_loop", "dense"]
    assert names["moe_loop"].cfg.model.moe_kernel == "loop"
    assert names["moe_grouped_mm"].cfg.model.moe_kernel == "grouped_mm"
    assert names["dense"].cfg.model.moe_experts == 0
    import torch

    if not torch.cuda.is_available():
        assert names["moe_grouped_mm"].skipped == moe.GROUPED_MM_NEEDS


def test_ratios_and_deadline() -> None:
    def runs(*rates: float | None) -> list[dict]:
        return [{"status": "error"} if r is None else {"tokens_per_s": r} for r in rates]

    figures = {
        "moe_loop": {"status": "ok", "tokens_per_s": {"median": 50.0}},
        "dense": {"status": "ok", "tokens_per_s": {"median": 100.0}},
        "moe_grouped_mm": {"status": "skipped", "runs": []},
    }
    figures["moe_loop"]["runs"] = runs(50.0, 40.0, 60.0, None)
    figures["dense"]["runs"] = runs(100.0, 200.0, None, 30.0)  # repeats 3, 4 are not pairs
    assert moe_figures.ratios(figures) == {
        "moe_loop/dense": {"of_medians": 0.5, "paired_median": 0.35, "paired": [0.5, 0.2]}
    }
    # Where some pairs were undisturbed on both sides, only those count.
    figures["moe_loop"]["runs"][1]["undisturbed"] = figures["dense"]["runs"][1]["undisturbed"] = (
        True
    )
    assert moe_figures.ratios(figures)["moe_loop/dense"]["paired"] == [0.2]
    assert moe.Deadline(0, start=0.0).allows("x")  # no deadline
    assert not moe.Deadline(5, start=time.perf_counter()).allows("x")  # under 10 s left
    clock = moe.Deadline(100, start=time.perf_counter())
    assert clock.allows("x")
    clock.record("x", 90.0)  # another run of 90 s (x 1.2 for safety) would end past 100 s
    assert not clock.allows("x") and not clock.allows("y")
    clock.record("y", 5.0)
    assert clock.allows("y")


@pytest.mark.slow
def test_a_one_step_rehearsal_writes_the_json_into_out_only(tmp_path: Path) -> None:
    argv = ["--preset", "cpu", "--parts", "throughput", "--dry-run", "--out", str(tmp_path)]
    argv += ["--warmup", "1", "--steps", "1", "--repeats", "1", *TINY]
    assert moe.main(argv) == 0
    (path,) = tmp_path.glob("moe-dryrun-*.json")
    record = json.loads(path.read_text())
    figures = record["throughput"]["contenders"]
    assert figures["moe_loop"]["status"] == figures["dense"]["status"] == "ok"
    assert figures["moe_loop"]["total_params"] > figures["dense"]["total_params"]
    assert record["throughput"]["active_params"]["matched"]
    assert "moe_loop/dense" in record["throughput"]["ratios"]


def test_memory_layouts_are_checked_before_any_process_starts() -> None:
    assert moe_memory.layout_flags([1, 4], world=4)[4][-1] == "--parallel.ep=4"
    with pytest.raises(ConfigError, match=r"parallel.ep \(8\) must divide parallel.dp_shard"):
        moe_memory.layout_flags([8], world=4)


@pytest.mark.slow
def test_memory_expert_weights_served_per_rank_scale_as_one_over_ep() -> None:
    model = [*moe_memory.MODEL, "--model.n_layers=1", "--model.moe_experts=4"]
    ranks = moe_memory.measure([1, 2], world=2, model=model)
    rows = [moe_memory.summary(ep, ranks[ep]) for ep in (1, 2)]
    one, two = rows
    assert (one["experts_served"], two["experts_served"]) == (4, 2)
    assert two["expert_gathered_mb"] == pytest.approx(one["expert_gathered_mb"] / 2)
    assert one["expert_gathered_mb"] == pytest.approx(one["expert_total_mb"])
    for row in rows:
        # FSDP shards the rest of the way: every rank holds 1/world of the experts either way,
        # and AdamW keeps two moments of what it holds.
        assert row["params_expert_mb"] == pytest.approx(row["expert_total_mb"] / 2)
        assert row["grads_expert_mb"] == pytest.approx(row["params_expert_mb"])
        assert row["optimizer_expert_mb"] == pytest.approx(2 * row["params_expert_mb"])
        assert row["params_dense_mb"] > 0
    scale = moe_memory.scaling(rows)["ep=2"]
    assert scale["one_over_ep"] == scale["experts_served"] == scale["expert_gathered_mb"] == 0.5
    assert scale["params_expert_mb"] == 1.0


@pytest.mark.slow
def test_run_gpu_dry_run_rehearses_the_moe_stage_into_out_only(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    before = sorted((root / "bench" / "results").iterdir())
    cmd = ["bash", str(root / "bench" / "run_gpu.sh"), "--dry-run", "--python", sys.executable]
    proc = subprocess.run(
        [*cmd, "--stages", "moe", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted((root / "bench" / "results").iterdir()) == before
    (path,) = tmp_path.glob("moe-dryrun-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["dry_run"] and record["protocol"]["deadline_s"] > 0
    assert record["throughput"]["contenders"]["moe_loop"]["status"] == "ok"
    assert "moe_loop/dense" in (tmp_path / "moe.log").read_text()
