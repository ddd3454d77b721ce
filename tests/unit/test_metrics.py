"""FLOPs per token, device peaks, throughput and the JSONL sink."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrib.config import MetricsConfig, ModelConfig
from distrib.metrics import MetricsLogger, Throughput, flops_per_token, memory_gb, peak_tflops
from distrib.models.llama import Transformer


def test_flops_per_token_hand_count() -> None:
    cfg = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=10)
    # Per layer: q 8x8, k and v 8x4 each, o 8x8 = 192; SwiGLU 3 x 8 x 16 = 384. Head 10 x 8.
    matmul_params = 2 * (192 + 384) + 80
    assert flops_per_token(cfg, seq_len=4) == 6 * matmul_params + 12 * 2 * 4 * 8


def test_flops_per_token_matches_flop_counter() -> None:
    """Against PyTorch's own count of one forward + backward (causal attention through eager
    math, which FlopCounterMode sees as full matmuls, as our formula counts them)."""
    cfg = ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        vocab_size=512,
        max_seq_len=64,
        attention="eager",
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, 512, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(cfg, 64) == pytest.approx(measured, rel=0.02)


def test_peak_lookup_and_override() -> None:
    assert peak_tflops(torch.device("cpu"), "bfloat16") is None
    assert peak_tflops(torch.device("cpu"), "bfloat16", override=123.0) == 123.0


def test_throughput_counts_tokens_once_and_pauses() -> None:
    meter = Throughput(flops_per_token=1e6, num_devices=2, peak=10.0)
    meter.add(1000)
    with meter.paused():
        time.sleep(0.05)
    figures = meter.read()
    assert figures["tokens_per_s"] > 1000 / 0.05  # the paused time is left out
    assert figures["tflops"] == pytest.approx(figures["tokens_per_s"] * 1e6 / 2 / 1e12)
    assert figures["mfu"] == pytest.approx(figures["tflops"] / 10.0)
    assert Throughput(1.0, 1, None).read()["mfu"] is None


def test_memory_is_reported_on_cpu() -> None:
    assert memory_gb(torch.device("cpu")) > 0


def test_jsonl_sink_and_disabled_ranks(tmp_path: Path) -> None:
    cfg = MetricsConfig(progress=False)
    log = MetricsLogger(cfg, tmp_path, enabled=True, total_steps=2, start_step=0)
    log.log({"step": 1, "loss": 2.5, "mfu": None})
    log.log({"step": 2, "loss": math.nan})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5, "mfu": None}, {"step": 2, "loss": None}]
    quiet = MetricsLogger(cfg, tmp_path / "other", enabled=False, total_steps=2, start_step=0)
    quiet.log({"step": 1})
    quiet.close()
    assert not (tmp_path / "other").exists()
