"""How long training stalls for a checkpoint: synchronous save vs `checkpoint.async`.

One process holds a Llama-class model (about 125M parameters by default) and its AdamW state
after one step, as `distrib train` builds them (`NativeEngine`), and saves the engine state
through `Checkpointer` exactly as the trainer does: DCP files, then the manifest (sizes and
SHA-256 of every file), then the rename into place.

- sync: the training thread is blocked for the whole save.
- async: the training thread is blocked only until DCP has staged a copy of the state in
  memory; writing, hashing and renaming run in the background (`total` is save to finished).

Modes alternate over `--repeats`; medians are reported. Target: async stall <= 1/5 of the
synchronous save.

    python -m bench.checkpoint [--repeats 3] [--dir /path/on/the/disk/to/test]
                               [--section.key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, summarize, table, write_result
from distrib import checkpoint as ckpt
from distrib.config import CheckpointConfig, load_config, to_dict
from distrib.data.loader import Batch
from distrib.engines.native import NativeEngine
from distrib.models.build import build_model
from distrib.models.transformer import num_params

TARGET_RATIO = 0.2  # async stall / sync save
MODEL = [
    "--model.dim=768",
    "--model.n_layers=12",
    "--model.n_heads=12",
    "--model.n_kv_heads=4",
    "--model.ffn_dim=2048",
    "--model.vocab_size=32000",
    "--model.max_seq_len=128",
    "--model.tie_embeddings=false",
    "--data.seq_len=128",
]


def build_engine(overrides: list[str]) -> tuple[NativeEngine, Any]:
    """The engine after one optimizer step, so the AdamW moments exist and are saved."""
    cfg = load_config(None, [*MODEL, *overrides])
    device = torch.device("cpu")
    engine = NativeEngine([build_model(cfg.model, device, 0)], cfg.training, device)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len + 1))
    engine.train_step([Batch(tokens[:, :-1], tokens[:, 1:])])
    return engine, cfg


def save_once(
    engine: NativeEngine, checkpointer: ckpt.Checkpointer, step: int, background: bool
) -> dict[str, float]:
    """One save as the trainer makes it; the checkpointer lives across saves, as in a run (its
    staging buffers are reused)."""
    state = {**engine.checkpoint_state(), "step": step}
    start = time.perf_counter()
    path = checkpointer.save(step, state, background=background)
    stall = time.perf_counter() - start
    checkpointer.wait()
    total = time.perf_counter() - start
    assert ckpt.is_complete(path), path
    return {"stall_s": stall, "total_s": total}


def measure(
    engine: NativeEngine, repeats: int, parent: Path | None
) -> tuple[dict[str, list[dict[str, float]]], int]:
    """`repeats` interleaved sync and async saves in a temporary folder under `parent`; the
    timings per mode and the checkpoint's size in bytes."""
    root = Path(tempfile.mkdtemp(prefix="distrib-bench-ckpt-", dir=parent))
    runs: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    savers = {
        mode: ckpt.Checkpointer(CheckpointConfig(async_save=mode == "async", keep=1), root / mode)
        for mode in runs
    }
    try:
        # The first save of a run allocates the staging buffers: a cost paid once per run.
        save_once(engine, savers["async"], 0, background=True)
        for i in range(repeats):
            for mode in ("sync", "async"):
                runs[mode].append(save_once(engine, savers[mode], i + 1, mode == "async"))
        size = sum(p.stat().st_size for p in (root / "sync").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return runs, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args, overrides = parser.parse_known_args(argv)
    engine, cfg = build_engine(overrides)
    runs, size = measure(engine, args.repeats, args.dir)
    sync = summarize([r["total_s"] for r in runs["sync"]])
    stall = summarize([r["stall_s"] for r in runs["async"]])
    total = summarize([r["total_s"] for r in runs["async"]])
    ratio = stall["median"] / sync["median"]
    params = num_params(engine.model)
    print(
        f"model {params / 1e6:.1f}M parameters; checkpoint {size / 2**30:.2f} GiB (model + AdamW)"
    )
    print(
        table(
            [
                ["mode", "training stall (s)", "save to finished (s)", "spread"],
                ["sync", f"{sync['median']:.3f}", f"{sync['median']:.3f}", f"{sync['spread']:.0%}"],
                [
                    "async",
                    f"{stall['median']:.3f}",
                    f"{total['median']:.3f}",
                    f"{stall['spread']:.0%}",
                ],
            ]
        )
    )
    passed = ratio <= TARGET_RATIO
    print(
        f"async stall / sync save = {ratio:.3f} (target <= {TARGET_RATIO}): {'PASS' if passed else 'FAIL'}"
    )
    device = torch.device("cpu")
    path = write_result(
        "checkpoint",
        device,
        {
            **environment(device),
            "config": to_dict(cfg),
            "params": params,
            "checkpoint_bytes": size,
            "sync_save_s": sync,
            "async_stall_s": stall,
            "async_total_s": total,
            "stall_ratio": ratio,
            "target": {"stall_ratio_max": TARGET_RATIO, "passed": passed},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
