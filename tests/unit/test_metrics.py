"""FLOPs per token, device peaks, throughput and the JSONL sink."""

import math
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distrib.config import MetricsConfig
from distrib.models.transformer import Transformer
from distrib.train.metrics import MetricsLogger, Throughput, flops_per_token, memory_gb, peak_tflops
from tests.support.runs import records
from tests.support.tiny import tiny_config


def test_flops_per_token_hand_count() -> None:
    cfg = tiny_config()
    # The parameters in matrix products, counted on the model: every linear layer's weight (q, k,
    # v, o; SwiGLU's three; the output head), not the embedding lookup or the norms.
    with torch.device("meta"):
        model = Transformer(cfg)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * cfg.n_layers + 1
    matmul_params = sum(m.weight.numel() for m in linears)
    # Attention's score and value products: 2 x 2 x seq_len x dim per layer forward, x3 in all.
    seq_len = 16
    attention = 12 * cfg.n_layers * seq_len * cfg.dim
    assert flops_per_token(cfg, seq_len) == 6 * matmul_params + attention


def test_flops_per_token_matches_flop_counter() -> None:
    """Against PyTorch's own count of one forward + backward (causal attention through eager
    math, which FlopCounterMode sees as full matmuls, as our formula counts them)."""
    cfg = tiny_config(attention="eager")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    measured = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(cfg, cfg.max_seq_len) == pytest.approx(measured, rel=0.02)


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
    assert records(tmp_path) == [{"step": 1, "loss": 2.5, "mfu": None}, {"step": 2, "loss": None}]
    quiet = MetricsLogger(cfg, tmp_path / "other", enabled=False, total_steps=2, start_step=0)
    quiet.log({"step": 1})
    quiet.close()
    assert not (tmp_path / "other").exists()
