"""The data loader alone: tokens/s `TokenLoader.next_step()` delivers, against what training eats.

Reads the train split of the prepared dataset (`data.dir`, prepared first if missing) with the
config's seq_len, global and micro batch, exactly as `distrib train` builds it (shuffled, dp rank
0 of 1). A timed step is one `next_step()`: the memmap gather, the int64 tensor conversion, the
split into micro-batches and, with document_ids=True, the per-token document ids. Each mode runs
until `--seconds` or `--max-steps`, interleaved over `--repeats`; medians are reported.

Training's consumption is the distrib figure of the newest bench/results throughput JSON for this
device kind, else a few distrib steps measured here. Target: loader >= 50x training.

    python -m bench.loader [--config C] [--seconds 4 --max-steps 5000 --repeats 3]
                           [--section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import environment, latest_result, summarize, table, write_result
from distrib.config import Config, load_config, to_dict
from distrib.data.loader import TokenLoader, document_ids
from distrib.data.prepare import prepare_dataset
from distrib.data.shards import MANIFEST_FILE, TokenShards
from distrib.errors import ConfigError
from distrib.runtime import Runtime, init_runtime
from distrib.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

TARGET_RATIO = 50.0  # the loader must outpace training by this factor


def make_loader(cfg: Config, doc_ids: bool) -> TokenLoader:
    t = cfg.training
    return TokenLoader(
        TokenShards.open(cfg.data.dir, "train"),
        seq_len=cfg.data.seq_len,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=t.seed,
        document_ids=doc_ids,
    )


def loader_rate(cfg: Config, doc_ids: bool, seconds: float, max_steps: int) -> dict[str, Any]:
    """Steps and tokens/s of `next_step()` over a fresh loader (epochs roll over as they come)."""
    loader = make_loader(cfg, doc_ids)
    for _ in range(5):  # page in the first windows, build the first permutation
        loader.next_step()
    steps, start = 0, time.perf_counter()
    while steps < max_steps and time.perf_counter() - start < seconds:
        loader.next_step()
        steps += 1
    elapsed = time.perf_counter() - start
    tokens = steps * cfg.training.global_batch_size * cfg.data.seq_len
    return {"steps": steps, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def doc_id_cost(cfg: Config, calls: int = 2000) -> float:
    """Microseconds per micro-batch of `document_ids` alone, on real windows."""
    batch = make_loader(cfg, False).next_step()[0]
    eos = TokenShards.open(cfg.data.dir, "train").eos_id
    start = time.perf_counter()
    for _ in range(calls):
        document_ids(batch.inputs, eos)
    return 1e6 * (time.perf_counter() - start) / calls


def training_rate(cfg: Config, runtime: Runtime) -> tuple[float, str]:
    """Tokens/s training consumes: the latest throughput result, else 1 + 3 distrib steps."""
    found = latest_result("throughput", runtime.device)
    if found is not None and "distrib" in found[1].get("contenders", {}):
        path, record = found
        return record["contenders"]["distrib"]["tokens_per_s"]["median"], path.name
    trainer = Trainer(cfg, runtime)
    trainer.engine.train_step(trainer.train_loader.next_step())
    start, steps = time.perf_counter(), 3
    for _ in range(steps):
        loss = trainer.engine.train_step(trainer.train_loader.next_step()).loss
    float(loss)  # waits for the device
    tokens = steps * cfg.training.global_batch_size * cfg.data.seq_len
    return tokens / (time.perf_counter() - start), "measured here: 1 warmup + 3 distrib steps"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TOML config (default configs/debug.toml)")
    p.add_argument("--seconds", type=float, default=4.0, help="time per mode per repeat")
    p.add_argument("--max-steps", type=int, default=5000, help="steps per mode per repeat, at most")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per mode")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    return p.parse_known_args(argv)


def _print_table(
    rows: dict[str, Any],
    train_tok_s: float,
    train_source: str,
    doc_record: dict[str, float],
    micro_per_step: int,
) -> None:
    """The loader's rates per mode against training's, and the document-id cost."""
    doc_us = doc_record["document_ids_us_per_micro_batch"]
    lines = [["mode", "tokens/s", "spread", "us/step", "x training"]]
    for mode, row in rows.items():
        lines.append(
            [
                mode,
                f"{row['tokens_per_s']['median']:,.0f}",
                f"{100 * row['tokens_per_s']['spread']:.1f}%",
                f"{row['step_us_median']:.0f}",
                f"{row['vs_training']:,.0f}x",
            ]
        )
    lines.append(["training (distrib)", f"{train_tok_s:,.0f}", "", "", "1x"])
    print(table(lines))
    print(f"training figure: {train_source}")
    print(
        f"document_ids: {doc_us:.1f} us per micro-batch, {doc_us * micro_per_step:.1f} us per step "
        f"({100 * doc_record['share_of_training_step']:.2g}% of a training step)"
    )
    for mode, row in rows.items():
        print(
            f"loader ({mode}) >= {TARGET_RATIO:.0f}x training: "
            f"{row['vs_training']:,.0f}x -> {'PASS' if row['pass'] else 'FAIL'}"
        )


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config or ROOT / "configs" / "debug.toml", overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if not (Path(cfg.data.dir) / MANIFEST_FILE).is_file():
        prepare_dataset(cfg.data, cfg.model.vocab_size, cfg.training.seed)
    modes = {"plain": False, "document_ids": True}
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, doc_ids in modes.items():  # interleaved
            raw[mode].append(loader_rate(cfg, doc_ids, args.seconds, args.max_steps))
    runtime = init_runtime()
    train_tok_s, train_source = training_rate(cfg, runtime)
    tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
    rows: dict[str, Any] = {}
    for mode, runs in raw.items():
        rate = summarize([r["tokens_per_s"] for r in runs])
        rows[mode] = {
            "tokens_per_s": rate,
            "step_us_median": 1e6 * tokens_per_step / rate["median"],
            "steps": [r["steps"] for r in runs],
            "vs_training": rate["median"] / train_tok_s,
            "pass": rate["median"] / train_tok_s >= TARGET_RATIO,
        }
    micro_per_step = cfg.training.global_batch_size // cfg.training.micro_batch_size
    doc_us = doc_id_cost(cfg)
    doc_record = {
        "document_ids_us_per_micro_batch": doc_us,
        "document_ids_us_per_step": doc_us * micro_per_step,
        "step_us_difference": rows["document_ids"]["step_us_median"]
        - rows["plain"]["step_us_median"],
        "share_of_training_step": doc_us * micro_per_step * 1e-6 * train_tok_s / tokens_per_step,
    }
    _print_table(rows, train_tok_s, train_source, doc_record, micro_per_step)
    record = {
        "environment": environment(runtime.device) | {"numpy": np.__version__},
        "protocol": {
            "seconds_per_mode": args.seconds,
            "max_steps_per_mode": args.max_steps,
            "repeats": args.repeats,
            "interleaved": True,
            "tokens_per_step": tokens_per_step,
            "step": "TokenLoader.next_step(): gather, int64 tensors, micro-batch split",
        },
        "config": {"data": to_dict(cfg)["data"], "training": to_dict(cfg)["training"]},
        "modes": rows,
        "document_ids": doc_record,
        "training_tokens_per_s": train_tok_s,
        "training_source": train_source,
        "target": f"loader >= {TARGET_RATIO:.0f}x training tokens/s",
    }
    if not args.no_write:
        print(f"wrote {write_result('loader', runtime.device, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
