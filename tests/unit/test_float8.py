"""Float8 training without a GPU: the refusals (no torchao, no float8-capable GPU, TP) and which
linears the conversion picks. The conversion itself runs in tests/gpu/test_float8_cuda.py."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from distrib.config import ParallelConfig, TrainingConfig
from distrib.errors import ConfigError
from distrib.models.transformer import Transformer
from distrib.parallel.dims import ParallelDims
from distrib.parallel.float8 import apply_float8, float8_filter
from distrib.parallel.parallelize import parallelize
from tests.support.tiny import tiny_config


def _model(**overrides: int) -> Transformer:
    with torch.device("meta"):
        return Transformer(tiny_config(**overrides))


@pytest.fixture
def no_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao missing, whether or not this machine has it (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, "torchao", None)


@pytest.fixture
def fake_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import torchao` succeeds, but any use of torchao.float8 raises ImportError (not a
    ConfigError), so these tests fail if apply_float8 reaches torchao before its checks."""
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)


def test_missing_torchao_is_a_config_error(no_torchao: None) -> None:
    with pytest.raises(ConfigError, match="training.float8 = true needs torchao"):
        apply_float8(_model(), torch.device("cpu"))


def test_cpu_is_refused_before_torchao_is_used(fake_torchao: None) -> None:
    with pytest.raises(ConfigError, match=r"compute capability 8\.9\+.*got device cpu"):
        apply_float8(_model(), torch.device("cpu"))


def test_no_cuda_device_is_refused(fake_torchao: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"8\.9\+.*got no CUDA device"):
        apply_float8(_model())


def test_older_gpu_is_refused(fake_torchao: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"got NVIDIA A100 \(compute capability 8\.0\)"):
        apply_float8(_model(), torch.device("cuda", 0))


def test_tensor_parallel_is_refused(fake_torchao: None) -> None:
    with pytest.raises(ConfigError, match="parallel.tp = 2"):
        apply_float8(_model(), torch.device("cpu"), tp=2)


def test_parallelize_converts_float8_first(fake_torchao: None) -> None:
    # tp = 2 with no mesh: were TP applied before float8, this would fail on the mesh instead.
    dims = ParallelDims.from_config(ParallelConfig(tp=2), world_size=2)
    training = TrainingConfig(float8=True)
    with pytest.raises(ConfigError, match="parallel.tp = 2"):
        parallelize(_model(), dims, None, ParallelConfig(tp=2), training, torch.device("cpu"))


def test_parallelize_without_float8_needs_no_torchao(no_torchao: None) -> None:
    dims = ParallelDims.from_config(ParallelConfig(), world_size=1)
    model = _model()
    parallelize(model, dims, None, ParallelConfig(), TrainingConfig(), torch.device("cpu"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.cfg.n_layers + 1
    assert all(type(m) is torch.nn.Linear for m in linears)


BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
FFN_LINEARS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@pytest.mark.parametrize(
    ("overrides", "picked"),
    [
        # dim 32, ffn 64, head dim 8 with 2 kv heads (wk/wv out 16): every block linear qualifies.
        ({}, BLOCK_LINEARS + FFN_LINEARS),
        # One kv head (wk/wv out 8) and ffn 40: only wq and wo have all dims divisible by 16.
        ({"n_kv_heads": 1, "ffn_dim": 40}, ("attention.wq", "attention.wo")),
    ],
)
def test_filter_picks_block_linears_with_aligned_dims(
    overrides: dict[str, int], picked: tuple[str, ...]
) -> None:
    model = _model(**overrides)
    assert model.output is not None and model.output.out_features % 16 == 0
    chosen = {name for name, module in model.named_modules() if float8_filter(module, name)}
    expected = {f"layers.{i}.{name}" for i in range(model.cfg.n_layers) for name in picked}
    assert chosen == expected
    assert "output" not in chosen
