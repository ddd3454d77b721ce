"""Per-rank memory of full fine-tuning vs LoRA on the same model and layout.

    python -m bench.finetune_memory                # 4 contenders x 4 layouts: ~3-4 min on CPU
    python -m bench.finetune_memory --layouts single tp=2 --contenders full lora

Contenders: `full` (every weight trains), `lora` (rank 8, alpha 16, adapters on every linear
layer of the blocks: `lora.targets = all`), and both again under bfloat16 autocast
(`training.dtype = bfloat16`), `lora_bf16` with its frozen base held in bfloat16
(`lora.base_dtype = bfloat16`); `full_bf16` is there so that lora_bf16's peak has a twin with
the same activations. Layouts (bench.memory's): single process, dp_shard=2 (FSDP2), tp=2 and
DeepSpeed ZeRO-2 (`ds_zero2`), or any other of bench.memory's with `--layouts`.

The parent process builds bench.memory's debug-shaped model (untied: 5.2M parameters) with its
seed's initial weights once and writes it as a Hugging Face folder (config.json,
model.safetensors) in a temporary folder: the base every row starts from
(`model.init_from = "hf:..."`), so nothing is downloaded. Every row then runs as bench.memory's
do, under `torchrun --standalone`: each rank builds the engine as `distrib train` does
(`build_engine`, the model keys resolved from the folder as the CLI resolves them), takes one
micro-batch's backward to read its gradients, then two full optimizer steps, and reports the
bytes it holds locally (DTensor shards as their local part) and its peak (CUDA max allocated,
or peak RSS on a CPU, which includes the Python and torch runtime, ~0.3-0.5 GB). Then the
ranks save the engine's state with distrib's `Checkpointer`, as the trainer does, and the row
reports the checkpoint's size on disk (all ranks' files; a LoRA checkpoint holds only the
adapters and their AdamW moments, the frozen base being rebuilt from `model.init_from`).

The objective is SFT (`training.objective = sft`): synthetic micro-batches of uniform random
tokens whose first half (the "prompt") is masked out of the loss. Memory does not depend on
the token values; the masking only makes the rows what fine-tuning runs. Under DeepSpeed the
gradient column is "-" and the optimizer column includes ZeRO's float32 master partition, as in
bench.memory. Prints a table, writes bench/results/finetune_memory-<device>-<date>.json with
every rank's figures and each LoRA row's figures over its full twin's (`ratios_to_full`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import memory
from bench.common import environment, table, write_result
from distrib import checkpoint as ckpt
from distrib.config import CheckpointConfig, Config, load_config
from distrib.data.loader import Batch
from distrib.engines.build import build_engine
from distrib.models.loss import IGNORE_INDEX
from distrib.runtime import Runtime, detect_launch, init_runtime, shutdown

MB = memory.MB
# Fine-tuning on chat data, padded (the synthetic batches carry no document ids).
FINETUNE = ["--training.objective=sft", "--data.format=chat", "--data.packing=pad"]
LORA = ["--lora.rank=8", "--lora.alpha=16", "--lora.targets=all"]
BF16 = ["--training.dtype=bfloat16"]  # autocast; the native engine keeps float32 weights
CONTENDERS = {
    "full": [],
    "lora": LORA,
    "full_bf16": BF16,
    "lora_bf16": [*LORA, "--lora.base_dtype=bfloat16", *BF16],
}
LAYOUTS = ["single", "dp_shard=2", "tp=2", "ds_zero2"]


def write_base(folder: Path, flags: list[str]) -> Path:
    """The model of `flags` with its seed's initial weights, written to `folder` as a Hugging Face
    folder (config.json, model.safetensors) that `model.init_from = "hf:<folder>"` loads."""
    from huggingface_hub import save_torch_state_dict

    from distrib.commands.export import hf_state_dict
    from distrib.models.build import build_model
    from distrib.models.hf_families import hf_config

    cfg = load_config(None, flags)
    model = build_model(cfg.model, torch.device("cpu"), cfg.training.seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(hf_state_dict(model), folder, metadata={"format": "pt"})
    hf_config(cfg.model).save_pretrained(folder)
    return folder


def row_flags(base: Path, contender: str, layout: str) -> tuple[int, list[str]]:
    """(process count, config overrides) of one row: the layout's, the base, fine-tuning and
    the contender's."""
    nproc, layout_flags = memory.LAYOUTS[layout]
    return nproc, [*layout_flags, f"--model.init_from=hf:{base}", *FINETUNE, *CONTENDERS[contender]]


def sft_batch(cfg: Config) -> Batch:
    """bench.memory's synthetic micro-batch with the first half of every row's labels (the
    prompt) left out of the loss, as SFT's labels are."""
    batch = memory.synthetic_batch(cfg)
    labels = batch.labels.clone()
    labels[:, : labels.shape[1] // 2] = IGNORE_INDEX
    return Batch(batch.inputs, labels, None)


def trainable(engine: Any) -> dict[str, float]:
    """This rank's bytes of trainable parameters and the model's trainable parameter count."""
    parts = getattr(engine, "parts", None) or [engine.model]
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    # A ZeRO-3 parameter is an empty placeholder: its partition is ds_tensor, its size ds_numel.
    local = [getattr(p, "ds_tensor", p) for p in params]
    return {
        "trainable_mb": memory._bytes(local) / MB,  # noqa: SLF001 - bench.memory's byte count
        "trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }


def folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, at any depth."""
    return [p for p in folder.rglob("*") if p.is_file()]


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder`."""
    return sum(p.stat().st_size for p in folder_files(folder))


def checkpoint_size(engine: Any, folder: Path) -> dict[str, float]:
    """Save the engine's state under `folder` as the trainer does (every rank together); the
    checkpoint's size on disk, all ranks' files and the manifest."""
    checkpointer = ckpt.Checkpointer(CheckpointConfig(), folder)
    path = checkpointer.save(2, {**engine.checkpoint_state(), "step": 2})
    return {
        "checkpoint_mb": folder_bytes(path) / MB,
        "checkpoint_files": len(folder_files(path)),
    }


def worker(overrides: list[str], out: str) -> None:
    """One rank: build, measure, save a checkpoint; rank 0 writes the ranks' figures."""
    from distrib.models.hf import init_from_model_config

    runtime = init_runtime()
    try:
        cfg = load_config(None, [*memory.MODEL, *overrides], init_from_model_config)
        engine, _, _ = build_engine(cfg, Runtime(detect_launch(), runtime.device))
        record = {
            "rank": runtime.rank,
            **memory.measure(engine, sft_batch(cfg), runtime.device),
            **trainable(engine),
        }
        # After the peak is read: saving stages copies of the state.
        record.update(checkpoint_size(engine, Path(out).parent / "run"))
        memory.write_ranks(record, runtime, out)
    finally:
        shutdown()


def _mb(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(results: dict[str, dict[str, list[dict]]]) -> list[list[str]]:
    """The printed table: one line per layout, contender and rank; the checkpoint's size (all
    ranks' files) on each row's first rank."""
    rows = [
        [
            "layout",
            "contender",
            "rank",
            "params MB",
            "trainable MB",
            "grads MB",
            "optim MB",
            "peak MB",
            "ckpt MB",
        ]
    ]
    for layout, contenders in results.items():
        for contender, ranks in contenders.items():
            for i, r in enumerate(ranks):
                rows.append(
                    [
                        layout,
                        contender,
                        str(r["rank"]),
                        _mb(r["params_mb"]),
                        _mb(r["trainable_mb"], 3),
                        _mb(r["grads_mb"], 3),
                        _mb(r["optimizer_mb"], 3),
                        _mb(r["peak_mb"], 0),
                        _mb(r["checkpoint_mb"], 3) if i == 0 else "",
                    ]
                )
    return rows


def reference(contender: str) -> str:
    """The full fine-tuning contender a LoRA one compares with: the same compute dtype."""
    return contender.replace("lora", "full")


def ratios(results: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per layout, each LoRA contender's rank-0 figures over those of full fine-tuning in the
    same dtype on the same layout (where both ran)."""
    keys = ("params_mb", "grads_mb", "optimizer_mb", "peak_mb", "checkpoint_mb")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layout, contenders in results.items():
        pairs = {
            f"{name}/{reference(name)}": (ranks[0], contenders[reference(name)][0])
            for name, ranks in contenders.items()
            if name.startswith("lora") and reference(name) in contenders
        }
        out[layout] = {
            pair: {k: lora[k] / full[k] for k in keys if lora[k] is not None and full[k]}
            for pair, (lora, full) in pairs.items()
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="*", default=LAYOUTS, choices=list(memory.LAYOUTS))
    parser.add_argument(
        "--contenders", nargs="*", default=list(CONTENDERS), choices=list(CONTENDERS)
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        worker([a for a in rest if a != "--"], args.out)
        return
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = write_base(Path(tmp) / "base", memory.MODEL)
        for layout in args.layouts:
            results[layout] = {}
            for contender in args.contenders:  # contenders adjacent: same layout, back to back
                nproc, flags = row_flags(base, contender, layout)
                name = f"{layout} {contender}"
                results[layout][contender] = memory.run_layout(
                    name, nproc, flags, "bench.finetune_memory"
                )
                print(f"{name}: done", flush=True)
    print(table(table_rows(results)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "environment": environment(device),
        "model": memory.MODEL,
        "finetune": FINETUNE,
        "contenders": {c: CONTENDERS[c] for c in args.contenders},
        "layouts": {name: memory.LAYOUTS[name][1] for name in args.layouts},
        "results": results,
        "ratios_to_full": ratios(results),
    }
    print(f"wrote {write_result('finetune_memory', device, record)}")


if __name__ == "__main__":
    main()
