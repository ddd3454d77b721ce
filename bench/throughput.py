"""Training throughput: distrib vs a minimal PyTorch loop vs the Hugging Face Trainer.

All three train the same Llama (same shapes, same initial weights) on the same token windows in
the same order: each sequence is `seq_len` input tokens, every one of them a label, so an
optimizer step is `global_batch_size x seq_len` tokens for every contender. Same AdamW
hyper-parameters, gradient clipping, micro-batch and accumulation. Each repeat builds every
contender afresh, runs `--warmup` untimed steps, then times `--steps` steps; repeats are
interleaved (A B C A B C ...) so drifts in machine load hit all alike, and medians are reported.

  distrib  `Trainer(cfg, init_runtime())` as `distrib train` builds it; times
           `engine.train_step(train_loader.next_step())`, the per-step work of its loop. Logging
           (one `.item()` every `log_every` steps), evaluation and checkpointing are left out:
           they are not per-step costs in steady state.
  minimal  the same `Transformer` built the same way, `torch.optim.AdamW` (foreach on CPU, fused
           on CUDA), `F.cross_entropy` on float32 logits, `clip_grad_norm_`, accumulation;
           batches gathered straight from the memmapped shards with numpy. No framework.
  hf       `transformers.LlamaForCausalLM` (sdpa) holding the same weights under
           `transformers.Trainer`, timed between `on_step_end` callbacks, so its data loading
           and per-step bookkeeping count as the others' do.

    python -m bench.throughput [--config C | --preset 1b] [--steps 10 --warmup 3 --repeats 3]
                               [--section.key=value ...]

Legend: B batch, L sequence (seq_len), V vocabulary, G global batch (sequences per step).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import environment, summarize, table, write_result
from bench.contenders import FOREIGN_MAX, RUNNERS, Run, Setup, paired_steps, run_one
from distrib.config import Config, load_config, to_dict
from distrib.data.prepare import prepare_dataset
from distrib.data.shards import MANIFEST_FILE, write_token_dataset
from distrib.errors import ConfigError
from distrib.runtime import init_runtime
from distrib.train.metrics import flops_per_token, peak_tflops

ROOT = Path(__file__).resolve().parent.parent

CONTENDERS = ("distrib", "minimal", "hf")
TARGET_VS_MINIMAL = 0.97  # distrib must reach this fraction of the minimal loop's tokens/s

# ~1B Llama (Llama 3.2 1B layout with a 32k vocabulary) for GPUs, on synthetic tokens.
PRESET_1B = [
    "--model.vocab_size=32000",
    "--model.max_seq_len=4096",
    "--data.seq_len=2048",
    "--data.tokenizer=",
    "--training.global_batch_size=16",
    "--training.micro_batch_size=4",
    "--training.dtype=bfloat16",
]


# --- configuration and data --------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TOML config (default configs/debug.toml)")
    p.add_argument("--preset", choices=("debug", "1b"), default="debug", help="1b: ~1B Llama")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per contender")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run"
    )
    p.add_argument(
        "--paired-steps",
        type=int,
        default=20,
        help="then distrib and minimal alternating step by step, N steps each (0: skip)",
    )
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args, overrides = p.parse_known_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1 (warmup's end starts the clock)")
    return args, overrides


def build_config(args: argparse.Namespace, overrides: list[str], tmp: Path) -> Config:
    """The run's config: debug.toml (or --config), the 1b preset's shapes on synthetic data in
    `tmp`, then the command line's overrides."""
    if args.preset == "1b":
        path = args.config or ROOT / "configs" / "llama3_1b.toml"
        return load_config(path, [*PRESET_1B, f"--data.dir={tmp / 'synthetic'}", *overrides])
    return load_config(args.config or ROOT / "configs" / "debug.toml", overrides)


def write_synthetic(cfg: Config, num_steps: int) -> None:
    """Uniform random tokens (EOS about every 1000) through the real shard writer: enough for
    `num_steps` global batches without reuse, and one global batch of validation."""
    seq_len, g, vocab = cfg.data.seq_len, cfg.training.global_batch_size, cfg.model.vocab_size
    rng = np.random.default_rng(cfg.training.seed)
    eos = vocab - 1

    def stream(n: int) -> np.ndarray:
        tokens = rng.integers(0, vocab - 1, size=n, dtype=np.int64)
        tokens[rng.random(n) < 1e-3] = eos
        return tokens

    train = stream(num_steps * g * seq_len + 1)
    write_token_dataset(cfg.data.dir, {"train": train, "val": stream(g * seq_len + 1)}, vocab, eos)


def ensure_data(cfg: Config, preset: str, num_steps: int) -> str:
    """Make sure cfg.data.dir holds a prepared dataset; returns what the data is."""
    if preset == "1b":
        write_synthetic(cfg, num_steps)
        return "synthetic: uniform random tokens, written with distrib's shard writer"
    if not (Path(cfg.data.dir) / MANIFEST_FILE).is_file():
        print(f"no prepared dataset in {cfg.data.dir}: preparing it", flush=True)
        prepare_dataset(cfg.data, cfg.model.vocab_size, cfg.training.seed)
    manifest = json.loads((Path(cfg.data.dir) / MANIFEST_FILE).read_text())
    return f"{cfg.data.dir}: {manifest.get('source', '')}"


def hf_available() -> bool:
    """transformers and accelerate (which its Trainer needs) importable."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"skipping hf: {err}", flush=True)
        return False
    return True


# --- report ------------------------------------------------------------------------------------


def rate(run: Run, s: Setup) -> float:
    """A repeat's tokens/s. Where every step was clocked (CPU), from the median time of the
    steps no other process disturbed (of all steps if fewer than 3 were undisturbed); on a
    shared machine a burst of foreign load then cannot move it. Else from the whole window."""
    if len(run.marks) == s.steps + 1:
        clean = run.clean_step_seconds()
        return s.tokens_per_step / float(np.median(clean if len(clean) >= 3 else run.step_seconds))
    return s.steps * s.tokens_per_step / run.seconds


def figures(runs: list[Run], s: Setup, peak: float | None) -> dict[str, Any]:
    """Per-contender record: tokens/s of every repeat and their median, TFLOP/s, MFU."""
    tok_s = summarize([rate(r, s) for r in runs])
    window = summarize([s.steps * s.tokens_per_step / r.seconds for r in runs])
    tflops = tok_s["median"] * flops_per_token(s.cfg.model, s.cfg.data.seq_len) / 1e12
    memory = [r.peak_memory_gb for r in runs if r.peak_memory_gb is not None]
    return {
        "tokens_per_s": tok_s,
        "tokens_per_s_whole_window": window,
        "step_seconds": [r.step_seconds for r in runs],
        "foreign_cpu_share": [r.foreign_share for r in runs],
        "undisturbed_steps": [len(r.clean_step_seconds()) for r in runs],
        "step_ms_median": 1e3 * s.tokens_per_step / tok_s["median"],
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gb": max(memory) if memory else None,
        "losses_first_repeat": runs[0].losses,
        "info": runs[0].info,
        "load_avg_1min": [r.info["load_avg_1min"] for r in runs],
    }


def compare(
    rows: dict[str, dict[str, Any]], runs: dict[str, list[Run]], s: Setup
) -> dict[str, Any]:
    """distrib / other (of the medians, and paired per repeat: same slot of the interleave), the
    targets, and the loss check: from the same weights and data, distrib and minimal agree at
    every step, HF at the first (its warmup starts at lr 0, distrib's at lr / warmup_steps)."""
    out: dict[str, Any] = {"ratios": {}, "targets": {}, "loss_check": {}}
    goals = {
        "minimal": ("distrib >= 0.97x minimal loop", TARGET_VS_MINIMAL),
        "hf": ("distrib faster than HF Trainer", 1.0 + 1e-12),
    }
    for other, (goal, threshold) in goals.items():
        if "distrib" not in rows or other not in rows:
            continue
        r = rows["distrib"]["tokens_per_s"]["median"] / rows[other]["tokens_per_s"]["median"]
        paired = [
            rate(d, s) / rate(o, s) for d, o in zip(runs["distrib"], runs[other], strict=True)
        ]
        out["ratios"][f"distrib/{other}"] = {"of_medians": r, "paired_per_repeat": paired}
        # On CPU a figure is trusted when most repeats had >= 3 steps nothing else disturbed.
        trusted = all(
            2 * sum(n >= 3 for n in rows[c]["undisturbed_steps"]) >= len(runs[c])
            for c in ("distrib", other)
        )
        conclusive = s.device.type == "cuda" or trusted
        out["targets"][goal] = {"ratio": r, "pass": r >= threshold, "conclusive": conclusive}
        ours, theirs = rows["distrib"]["losses_first_repeat"], rows[other]["losses_first_repeat"]
        n = len(ours) if other == "minimal" else 1
        out["loss_check"][f"{other}_max_abs_diff_first_{n}_steps"] = max(
            abs(a - b) for a, b in zip(ours[:n], theirs[:n], strict=True)
        )
    return out


def print_report(record: dict[str, Any], cuda: bool) -> None:
    rows = record["contenders"]
    base = rows.get("distrib", {}).get("tokens_per_s", {}).get("median")
    header = ["contender", "tokens/s", "spread", "step ms", "distrib / it"]
    header += ["TFLOP/s", "MFU", "mem GB"] if cuda else []
    lines = [header]
    for name, row in rows.items():
        med = row["tokens_per_s"]["median"]
        line = [
            name,
            f"{med:,.0f}",
            f"{100 * row['tokens_per_s']['spread']:.1f}%",
            f"{row['step_ms_median']:.1f}",
            f"{base / med:.3f}x" if base else "-",
        ]
        if cuda:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            line += [f"{row['tflops']:.1f}", mfu, f"{row['peak_memory_gb'] or 0:.1f}"]
        lines.append(line)
    print(table(lines))
    for name, target in record["targets"].items():
        caveat = "" if target["conclusive"] else " (inconclusive: other processes loaded the CPU)"
        print(f"{name}: {target['ratio']:.3f} -> {'PASS' if target['pass'] else 'FAIL'}{caveat}")
    paired = record["paired_steps"]
    if paired:
        ms = paired["median_step_ms"]
        print(
            f"paired steps ({paired['steps']} each, alternating): distrib {ms['distrib']:.1f} ms, "
            f"minimal {ms['minimal']:.1f} ms per step -> distrib/minimal "
            f"{paired['distrib/minimal']:.3f} (undisturbed steps: {paired['undisturbed_steps']})"
        )
    print("loss check:", json.dumps(record["loss_check"]))


def measure(args: argparse.Namespace, s: Setup, names: list[str]) -> dict[str, Any]:
    """Every repeat of every contender, interleaved, then the paired distrib/minimal steps."""
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:  # A B C A B C ...
            start = time.perf_counter()
            runs[name].append(run := run_one(name, s))
            clean = len(run.clean_step_seconds()) if len(run.marks) > 2 else "-"
            print(
                f"  repeat {repeat + 1} {name:8s} {rate(run, s):10,.0f} tokens/s "
                f"(timed {run.seconds:.2f} s of {time.perf_counter() - start:.1f} s; "
                f"{clean}/{args.steps} steps undisturbed)",
                flush=True,
            )
    paired = None
    if args.paired_steps and {"distrib", "minimal"} <= set(names):
        paired = paired_steps(s, args.paired_steps)
        gc.collect()
    peak = peak_tflops(s.device, s.cfg.training.dtype, s.cfg.metrics.peak_tflops)
    rows = {n: figures(runs[n], s, peak) for n in names}
    return {
        "flops_per_token": flops_per_token(s.cfg.model, s.cfg.data.seq_len),
        "peak_tflops": peak,
        "contenders": rows,
        **compare(rows, runs, s),
        "paired_steps": paired,
    }


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    tmp = Path(tempfile.mkdtemp(prefix="distrib-bench-"))
    try:
        cfg = build_config(args, overrides, tmp)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        data = ensure_data(cfg, args.preset, args.warmup + max(args.steps, args.paired_steps))
        threads = args.threads or torch.get_num_threads()
        s = Setup(cfg, init_runtime(), args.warmup, args.steps, threads, str(tmp / "run"))
        names = [n for n in args.contenders.split(",") if n in RUNNERS]
        names = [n for n in names if n != "hf" or hf_available()]
        t = cfg.training
        print(
            f"{s.device}, {threads} threads; {s.tokens_per_step} tokens/step ({t.global_batch_size}"
            f" x {cfg.data.seq_len}, micro {t.micro_batch_size}); {args.warmup} warmup + "
            f"{args.steps} timed steps x {args.repeats} repeats; data {data}",
            flush=True,
        )
        protocol = {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "repeats": args.repeats,
            "interleaved": True,
            "tokens_per_step": s.tokens_per_step,
            "tokens_per_sequence": "seq_len inputs, each with its next-token label",
            "distrib_excludes": "logging, evaluation, checkpointing (not per-step costs)",
            "tokens_per_s": "per repeat: CPU tokens/step / median time of the steps during "
            f"which other processes used < {FOREIGN_MAX:.0%} of a core; CUDA whole window",
        }
        record = {
            "environment": environment(s.device) | {"torch_threads": threads},
            "data": data,
            "preset": args.preset,
            "protocol": protocol,
            "config": to_dict(cfg),
            **measure(args, s, names),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(record, s.device.type == "cuda")
    if not args.no_write:
        print(f"wrote {write_result('throughput', s.device, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
