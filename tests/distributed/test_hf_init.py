"""`model.init_from = "hf:FOLDER"` under parallel layouts, through the real command line.

A random `transformers.LlamaForCausalLM` is saved to a folder; one process trains from it for two
steps, and its first-step loss (computed before any update) must equal the loss transformers
itself computes on the same first global batch, i.e. the imported model's logits are HF's. Then
each 2-process layout (FSDP, tensor parallel, a pipeline whose stages each load only their own
tensors) starting from the same folder must log the single-process losses (rtol 1e-5, the
tolerance of the layout parity tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distrib.config import Config, load_config
from distrib.data.loader import build_loaders
from distrib.models.hf import hf_config
from distrib.models.loss import causal_lm_loss
from tests.distributed.test_parity import RUN, _run

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

LOSS_RTOL = 1e-5
STEPS = ["--training.steps=2", "--training.warmup_steps=1"]
LAYOUTS = {
    "dp_shard": ["--parallel.dp_shard=2"],
    "tp": ["--parallel.tp=2"],
    "pp": ["--parallel.pp=2"],
}


def _config(data_dir: Path) -> Config:
    """The parity tests' run config (model shape, data, batch), as the CLI parses it."""
    return load_config(None, [*RUN, f"--data.dir={data_dir}"])


@pytest.fixture(scope="module")
def hf_folder(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random HF Llama of the run's model shape (norms randomized too), saved."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(_config(data_dir).model))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return folder


def _train(data_dir: Path, run_dir: Path, nproc: int, hf_folder: Path, layout: list[str]) -> list:
    args = [*STEPS, f"--model.init_from=hf:{hf_folder}", *layout]
    return [m["loss"] for m in _run(data_dir, run_dir, nproc, args) if "loss" in m]


def _hf_first_step_loss(data_dir: Path, hf_folder: Path) -> float:
    """transformers' mean loss over the micro-batches of the run's first global batch."""
    cfg = _config(data_dir)
    train, _ = build_loaders(cfg.data, cfg.training, 0, 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder)
    with torch.no_grad():
        losses = [
            causal_lm_loss(hf(input_ids=b.inputs).logits, b.labels) for b in train.next_step()
        ]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def reference(data_dir: Path, hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list:
    return _train(data_dir, tmp_path_factory.mktemp("ref"), 1, hf_folder, [])


def test_single_process_starts_from_hf_logits(
    data_dir: Path, hf_folder: Path, reference: list
) -> None:
    assert len(reference) == 2
    assert reference[0] == pytest.approx(_hf_first_step_loss(data_dir, hf_folder), rel=LOSS_RTOL)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_starts_from_the_same_weights(
    data_dir: Path, hf_folder: Path, reference: list, layout: list[str], tmp_path: Path
) -> None:
    losses = _train(data_dir, tmp_path / "run", 2, hf_folder, layout)
    assert losses == pytest.approx(reference, rel=LOSS_RTOL)
