"""bench.finetune_memory: the base it writes, the rows' configs, the SFT batch, the trainable
count, and the table and ratios it reports (no torchrun here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bench import finetune_memory as fm
from bench import memory
from distrib.config import load_config
from distrib.models.build import build_model, build_on_meta
from distrib.models.hf import init_from_model_config
from distrib.models.lora import apply_lora
from distrib.models.loss import IGNORE_INDEX
from distrib.parallel.init import materialize

TINY = [
    "--model.dim=32",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=64",
    "--model.vocab_size=128",
    "--model.max_seq_len=16",
    "--model.tie_embeddings=false",
    "--data.seq_len=16",
    "--training.global_batch_size=4",
    "--training.micro_batch_size=2",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fm.write_base(tmp_path_factory.mktemp("finetune") / "base", TINY)


def test_the_base_is_an_hf_folder_of_the_seeds_initial_weights(base: Path) -> None:
    assert {p.name for p in base.iterdir()} == {"config.json", "model.safetensors"}
    cfg = load_config(None, TINY)
    ours = build_model(cfg.model, torch.device("cpu"), cfg.training.seed)
    saved = load_file(base / "model.safetensors")
    assert len(saved) == len(ours.state_dict())
    torch.testing.assert_close(saved["model.embed_tokens.weight"], ours.tok_embeddings.weight)
    torch.testing.assert_close(saved["lm_head.weight"], ours.output.weight)


@pytest.mark.parametrize("contender", list(fm.CONTENDERS))
@pytest.mark.parametrize("layout", fm.LAYOUTS)
def test_every_row_is_a_valid_fine_tuning_config(base: Path, contender: str, layout: str) -> None:
    nproc, flags = fm.row_flags(base, contender, layout)
    assert nproc == memory.LAYOUTS[layout][0]
    cfg = load_config(None, [*TINY, *flags], init_from_model_config)
    assert cfg.model.init_from == f"hf:{base}"
    assert cfg.training.objective == "sft"
    assert cfg.lora.rank == (8 if contender.startswith("lora") else 0)
    assert cfg.lora.base_dtype == ("bfloat16" if contender == "lora_bf16" else "float32")
    assert cfg.training.dtype == ("bfloat16" if contender.endswith("bf16") else "float32")
    assert fm.reference(contender) in fm.CONTENDERS


def test_the_sft_batch_masks_the_prompt_half() -> None:
    cfg = load_config(None, TINY)
    plain, sft = memory.synthetic_batch(cfg), fm.sft_batch(cfg)
    assert sft.inputs.shape == (2, 16)
    assert torch.equal(sft.inputs, plain.inputs)
    assert bool((sft.labels[:, :8] == IGNORE_INDEX).all())
    assert torch.equal(sft.labels[:, 8:], plain.labels[:, 8:])
    assert not bool((plain.labels == IGNORE_INDEX).any())  # the original is left alone


def test_trainable_counts_only_the_adapters(base: Path) -> None:
    _, flags = fm.row_flags(base, "lora", "single")
    cfg = load_config(None, [*TINY, *flags], init_from_model_config)
    model = build_on_meta(cfg.model)
    apply_lora(model, cfg.lora)
    materialize(model, torch.device("cpu"), cfg.training.seed)
    # rank 8 on wq, wk, wv, wo (32 -> 32, 32 -> 16 twice, 32 -> 32) and w1, w3 (32 -> 64), w2
    per_layer = sum(8 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32)])
    per_layer += sum(8 * (i + o) for i, o in [(32, 64), (64, 32), (32, 64)])
    figures = fm.trainable(SimpleNamespace(parts=[model]))
    assert figures["trainable_params"] == 2 * per_layer
    assert figures["trainable_mb"] == pytest.approx(2 * per_layer * 4 / fm.MB)


def test_folder_bytes_counts_nested_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"12345")
    (tmp_path / "y").write_bytes(b"12")
    assert fm.folder_bytes(tmp_path) == 7
    assert len(fm.folder_files(tmp_path)) == 2  # the folder a is not a file


def _rank(rank: int, scale: float, grads: float | None = 1.0) -> dict:
    return {
        "rank": rank,
        "params_mb": 10 * scale,
        "trainable_mb": scale,
        "grads_mb": None if grads is None else grads * scale,
        "optimizer_mb": 2 * scale,
        "peak_mb": 100 * scale,
        "checkpoint_mb": 3 * scale,
    }


def test_table_and_ratios() -> None:
    results = {
        "dp_shard=2": {
            "full": [_rank(0, 1.0), _rank(1, 1.0)],
            "lora": [_rank(0, 0.5), _rank(1, 0.5)],
            "lora_bf16": [_rank(0, 0.25), _rank(1, 0.25)],  # its twin full_bf16 did not run
        },
        "ds_zero2": {"full": [_rank(0, 1.0, None)], "lora": [_rank(0, 0.1, None)]},
    }
    rows = fm.table_rows(results)
    assert rows[0][:3] == ["layout", "contender", "rank"] and len(rows) == 1 + 6 + 2
    assert rows[1] == [
        "dp_shard=2",
        "full",
        "0",
        "10.00",
        "1.000",
        "1.000",
        "2.000",
        "100",
        "3.000",
    ]
    assert rows[2][-1] == ""  # the checkpoint's size (all ranks) on the first rank's line only
    assert rows[-1][5] == "-"  # DeepSpeed keeps its gradients in its own buffers
    got = fm.ratios(results)
    assert got["dp_shard=2"] == {"lora/full": dict.fromkeys(got["dp_shard=2"]["lora/full"], 0.5)}
    assert set(got["dp_shard=2"]["lora/full"]) == {
        "params_mb",
        "grads_mb",
        "optimizer_mb",
        "peak_mb",
        "checkpoint_mb",
    }
    assert "grads_mb" not in got["ds_zero2"]["lora/full"]
    assert got["ds_zero2"]["lora/full"]["optimizer_mb"] == pytest.approx(0.1)
