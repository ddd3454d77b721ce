"""LoRA under FSDP2 (dp_shard = 2) and tensor + sequence parallelism (tp = 2) against one process.

One launch of two gloo processes trains both layouts in turn from the same random Hugging Face
base, adapters on every linear layer and the head (so colwise, rowwise and the vocab-parallel
head all carry sharded adapters). Each layout must log the single-process losses step for step
(rtol 1e-5, the layout parity tests' tolerance) and leave every base weight bitwise unchanged;
its checkpoint must hold only the adapters, and an engine resumed from it must take the next
step exactly as the one that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from distrib import checkpoint as ckpt
from distrib.config import CheckpointConfig, Config, LoraConfig, to_dict
from distrib.config.validate import validate
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.engines.native import NativeEngine
from distrib.models.hf import hf_config
from distrib.models.lora import is_adapter
from distrib.parallel.init import clean_name
from distrib.runtime import Runtime, detect_launch
from tests.support.tiny import tiny_config

from .harness import spawn

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

STEPS = 3
SEQUENCES, MICRO = 4, 2  # per step; one process runs two micro-batches of two
LOSS_RTOL = 1e-5
MODEL = tiny_config(n_layers=2, attention="eager")


def _config(base: Path, layout: dict[str, int]) -> Config:
    cfg = Config(model=tiny_config(n_layers=2, attention="eager", init_from=f"hf:{base}"))
    cfg.lora = LoraConfig(rank=4, alpha=8.0, targets="all,output")
    cfg.data.seq_len = 16
    t = cfg.training
    t.global_batch_size, t.micro_batch_size, t.lr, t.warmup_steps, t.steps = (
        SEQUENCES,
        MICRO,
        1e-2,
        1,
        10,
    )
    for key, degree in layout.items():
        setattr(cfg.parallel, key, degree)
    validate(cfg)
    return cfg


def _sequences(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, MODEL.vocab_size, (SEQUENCES, 17), generator=gen)


def _batches(step: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """This data-parallel rank's share of the step's sequences, in micro-batches of MICRO."""
    share = SEQUENCES // dp_size
    mine = _sequences(step)[dp_rank * share : (dp_rank + 1) * share]
    return [Batch(m[:, :-1], m[:, 1:]) for m in mine.split(MICRO)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _engine(cfg: Config) -> tuple[NativeEngine, int, int]:
    engine, dp_rank, dp_size = build_engine(cfg, Runtime(detect_launch(), torch.device("cpu")))
    assert isinstance(engine, NativeEngine)
    return engine, dp_rank, dp_size


def _train(cfg: Config, run_dir: Path | None = None) -> list[float]:
    """Train STEPS steps; the losses. Every base weight must come out bitwise unchanged. With
    `run_dir`, save a checkpoint there and resume a second engine from it."""
    engine, dp_rank, dp_size = _engine(cfg)
    params = {clean_name(n): p for part in engine.parts for n, p in part.named_parameters()}
    base = {n: _full(p).detach().clone() for n, p in params.items() if not is_adapter(n)}
    assert base and all(not p.requires_grad for n, p in params.items() if n in base)
    losses = [
        engine.train_step(_batches(step, dp_rank, dp_size)).loss.item() for step in range(STEPS)
    ]
    for name, before in base.items():
        assert torch.equal(_full(params[name]).detach(), before), f"{name} changed"
    if run_dir is not None:
        _save_and_resume(cfg, engine, run_dir, _batches(STEPS, dp_rank, dp_size))
    return losses


def _save_and_resume(cfg: Config, engine: NativeEngine, run_dir: Path, nxt: list[Batch]) -> None:
    checkpointer = ckpt.Checkpointer(CheckpointConfig(), run_dir, {"config": to_dict(cfg)})
    path = checkpointer.save(STEPS, engine.checkpoint_state())
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {k for k in saved if k.startswith("model.")} == {
        f"model.{clean_name(n)}" for n, p in engine.model.named_parameters() if p.requires_grad
    }
    resumed, _, _ = _engine(cfg)
    checkpointer.load(path, resumed.checkpoint_state())
    assert resumed.train_step(nxt).loss.item() == engine.train_step(nxt).loss.item()


def _layouts(rank: int, world_size: int, base: str, reference: list[float], out: str) -> None:
    for layout in ({"dp_shard": world_size}, {"tp": world_size}):
        losses = _train(_config(Path(base), layout), Path(out) / next(iter(layout)))
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(reference), rtol=LOSS_RTOL, atol=0, msg=str(layout)
        )


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(MODEL))
    folder = tmp_path_factory.mktemp("hf_base")
    hf.save_pretrained(folder)
    return folder


def test_fsdp_and_tensor_parallel_match_one_process(hf_base: Path, tmp_path: Path) -> None:
    reference = _train(_config(hf_base, {}))  # here, one process, no process group
    spawn(_layouts, 2, str(hf_base), reference, str(tmp_path))
