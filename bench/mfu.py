"""Throughput and MFU of distrib's training step over a matrix of settings.

Each setting is a set of config overrides (compile, attention backend, activation checkpointing,
micro-batch, chunked loss, float8) and runs in a fresh process (`bench/mfu_worker.py`):
`Trainer(cfg, init_runtime())` as `distrib train` builds it, `--warmup` untimed steps of
`engine.train_step(train_loader.next_step())` (compilation happens there), then `--steps` timed
steps. Per setting it reports tokens/s from the median step time, TFLOP/s and MFU
(`distrib.train.metrics.flops_per_token`, attention included, over `peak_tflops`), and peak
memory (CUDA max allocated; peak RSS on a CPU). The tokens are synthetic (uniform random, written
with distrib's shard writer), so no prepared dataset is needed.

The default plan (`bench/mfu_plan.py`) tries the likeliest winner first, then varies one axis at
a time from the best setting so far, measures the baseline, and runs the best setting again in a
fresh process as the figure to quote. `--full` runs the whole product instead. The JSON is
rewritten after every row; the MFU verdict is `incomplete` unless every planned row ran.

    python -m bench.mfu                                   # debug preset (CPU or GPU)
    python -m bench.mfu --preset 1b                       # ~1B Llama, bf16, synthetic tokens
    python -m bench.mfu --preset 1b --deadline-s 400 --out /tmp/gpu-results
    python -m bench.mfu --preset 1b --micro-batch-sizes 2,4,8 --full
    python -m bench.mfu --axes compile,attention --steps 5 --warmup 2

Legend: B batch, L sequence (seq_len), G global batch (sequences per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, environment, latest_result, name_slug
from bench.contenders import FOREIGN_MAX
from bench.mfu_plan import (
    AXES,
    CUDNN_BACKEND,
    Context,
    Setting,
    Stage,
    axis_values,
    build_plan,
    run_plan,
)
from bench.mfu_report import (
    print_table,
    quoted_best,
    rerun_ratio,
    speedup_over_cpu,
    target,
    verdict_line,
)
from bench.mfu_run import (
    COLD_COMPILE_S,
    Limits,
    measure_in_subprocess,
    probe_environment,
    write_json,
)
from bench.throughput import write_synthetic
from distrib.config import Config, load_config, to_dict
from distrib.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# ~1B Llama on synthetic tokens: 16 heads of 128, 8 KV heads, 32k vocabulary, seq 4096, bf16.
PRESET_1B = [
    "--model.dim=2048",
    "--model.n_layers=16",
    "--model.n_heads=16",
    "--model.n_kv_heads=8",
    "--model.ffn_dim=8192",
    "--model.vocab_size=32000",
    "--model.max_seq_len=4096",
    "--data.seq_len=4096",
    "--data.tokenizer=",
    "--training.global_batch_size=16",
    "--training.dtype=bfloat16",
]
PRESETS = {
    "debug": {"config": "configs/debug.toml", "overrides": [], "mbs": "8,16", "chunk": 1024},
    "1b": {
        "config": "configs/llama3_1b.toml",
        "overrides": PRESET_1B,
        "mbs": "2,4,8",
        "chunk": 8192,
    },
}

# --- the result file ---------------------------------------------------------------------------


def result_kind(preset: str) -> str:
    """The JSON's name stem: `mfu` for the debug preset (the file the GPU-over-CPU speed-up is
    read from), `mfu-<preset>` for the others, so two presets run on one day keep both files."""
    return "mfu" if preset == "debug" else f"mfu-{preset}"


def result_paths(args: argparse.Namespace, env: dict[str, Any]) -> list[Path]:
    """Where the JSON goes: bench/results (not with --no-write or --dry-run) and --out."""
    slug = name_slug(env["device_name"]) if env["device"].startswith("cuda") else "cpu"
    # A rehearsal's file never matches `<kind>-<device>-*`, the pattern results are read by.
    slug = f"dryrun-{slug}" if args.dry_run else slug
    name = f"{result_kind(args.preset)}-{slug}-{datetime.date.today().isoformat()}.json"
    dirs = [] if args.no_write or args.dry_run else [RESULTS_DIR]
    dirs += [Path(args.out)] if args.out else []
    return [d / name for d in dirs]


def protocol(args: argparse.Namespace, limits: Limits) -> dict[str, Any]:
    return {
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "plan": "full product"
        if args.full
        else "the likely best first (largest micro-batch that fits), then one axis at a time "
        "from the best so far, the baseline, then the best again in a fresh process",
        "process_per_setting": True,
        "timeouts_s": {"eager": limits.setting_timeout, "compiled": limits.compile_timeout},
        "budget_s": args.budget_s,
        "deadline_s": args.deadline_s,
        "tokens_per_s": "tokens per step / median step time (CUDA: events, one sync at "
        f"each end of the window; CPU: steps where other processes used < {FOREIGN_MAX:.0%}"
        " of a core, all steps when fewer than 3)",
        "flops": "distrib.train.metrics.flops_per_token (attention included, causal mask not "
        "discounted, recomputation not counted)",
        "attention_cudnn": f"backend '{CUDNN_BACKEND}'"
        if CUDNN_BACKEND
        else "not measured apart: distrib.models.attention has no cuDNN-first backend; sdpa "
        "pins FLASH > CUDNN > EFFICIENT",
    }


@dataclasses.dataclass
class Report:
    """Builds the JSON record from the rows so far and writes it to every path."""

    args: argparse.Namespace
    cfg: Config
    plan: list[Stage]
    env: dict[str, Any]
    data: str
    limits: Limits
    paths: list[Path]

    def record(self, rows: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
        a = self.args
        rows = [
            {k: v for k, v in r.items() if k not in ("setting_obj", "environment")} for r in rows
        ]
        cuda = self.env["device"].startswith("cuda")
        gpu = self.env["device_name"] if cuda else None
        return {
            "benchmark": result_kind(a.preset),
            "date": datetime.date.today().isoformat(),
            "environment": self.env,
            "gpu_name": gpu,
            "preset": a.preset,
            "dry_run": a.dry_run,
            "finished": finished,
            "data": self.data,
            "protocol": protocol(a, self.limits),
            "axes": axis_values(a.mbs, a.chunk, a.axis_list),
            "plan": "full" if a.full else [dataclasses.asdict(s) for s in self.plan],
            "config": to_dict(self.cfg),
            "rerun_ratio": rerun_ratio(rows),
            "rows": rows,
            "best": quoted_best(rows),
            "targets": target(a.preset, cuda or a.dry_run, gpu, rows, finished),
        }

    def save(self, rows: list[dict[str, Any]], finished: bool = False) -> dict[str, Any]:
        record = self.record(rows, finished)
        for path in self.paths:
            write_json(path, record)
        return record


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: `--section.key=value` overrides pass through untouched.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--preset", choices=tuple(PRESETS), default="debug")
    p.add_argument("--config", default=None, help="TOML config (default: the preset's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile: >= 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    p.add_argument("--micro-batch-sizes", default=None, help="comma list; first is the baseline")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, help="the chunked loss value")
    p.add_argument("--axes", default=",".join(AXES), help="axes to vary (others stay baseline)")
    p.add_argument("--full", action="store_true", help="the cartesian product, not the plan")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=0, help="start no setting after N s (0: no)")
    p.add_argument("--deadline-s", type=float, default=0, help="end within N s (0: no limit)")
    p.add_argument("--setting-timeout", type=float, default=1200, help="s per eager setting")
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help=f"s per compiled setting (default: --setting-timeout + {COLD_COMPILE_S:.0f})",
    )
    p.add_argument("--compare-cpu", default=None, help="CPU mfu JSON (default: newest committed)")
    p.add_argument("--out", default=None, help="also write the JSON and worker logs here")
    p.add_argument("--no-write", action="store_true", help="write no JSON into bench/results")
    p.add_argument("--dry-run", action="store_true", help="rehearsal: judge off CUDA, --out only")
    args, overrides = p.parse_known_args(argv)
    preset = PRESETS[args.preset]
    args.config_path = str(args.config or ROOT / preset["config"])
    args.mbs = [int(m) for m in (args.micro_batch_sizes or preset["mbs"]).split(",")]
    args.chunk = args.loss_chunk_tokens or preset["chunk"]
    args.axis_list = [a.strip() for a in args.axes.split(",") if a.strip()]
    if args.compile_timeout is None:
        args.compile_timeout = args.setting_timeout + COLD_COMPILE_S
    unknown = set(args.axis_list) - set(AXES)
    if unknown:
        p.error(f"unknown axes {sorted(unknown)}; valid: {', '.join(AXES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args, overrides


def synthetic_data(cfg: Config, num_steps: int) -> str:
    """Synthetic tokens in cfg.data.dir (a temporary folder): no prepared corpus is needed, so
    a copy of the repository without the git-ignored data/ runs as it is."""
    write_synthetic(cfg, num_steps)
    return "synthetic: uniform random tokens (EOS about every 1000), distrib's shard writer"


def print_speedup(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict | None:
    """The debug preset's GPU rows over the CPU rows of the same settings."""
    if args.compare_cpu:
        found = (Path(args.compare_cpu), json.loads(Path(args.compare_cpu).read_text()))
    else:
        found = latest_result("mfu", torch.device("cpu"))
    if not found:
        return None
    out = {"cpu_result": str(found[0])} | speedup_over_cpu(rows, found[1])
    for s in out["per_setting"]:
        print(f"GPU/CPU {Setting(**s['setting']).label()}: {s['speedup']:.1f}x")
    print(f"GPU best / CPU best: {out['best_over_best']}")
    return out


def run(args: argparse.Namespace, overrides: list[str], tmp: Path, start: float) -> int:
    # The synthetic data's folder comes last, so no override can point it at a real dataset.
    base = [*PRESETS[args.preset]["overrides"], *overrides, f"--data.dir={tmp / 'synthetic'}"]
    cfg = load_config(args.config_path, base)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    data = synthetic_data(cfg, args.warmup + args.steps)
    # On CUDA the environment is read in a child: this process never touches the GPU.
    env = (
        probe_environment(args.threads)
        if device_type == "cuda"
        else environment(torch.device("cpu"))
    )
    ctx = Context.detect(device_type, cfg.training.dtype, cfg.training.global_batch_size)
    plan = build_plan(axis_values(args.mbs, args.chunk, args.axis_list), ctx, args.full)
    limits = Limits(
        args.setting_timeout, args.compile_timeout, args.budget_s, args.deadline_s, start=start
    )
    logs = Path(args.out) / f"{result_kind(args.preset)}-workers" if args.out else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    report = Report(args, cfg, plan, env, data, limits, result_paths(args, env))
    print(
        f"{env['device_name']}; preset {args.preset}; {args.warmup} warmup + {args.steps} timed "
        f"steps; {'full product' if args.full else 'plan: likely best first'}; {data}",
        flush=True,
    )
    flags = [f"--config={args.config_path}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
    flags += [f"--threads={args.threads}", *base]
    rows = run_plan(plan, ctx, measure_in_subprocess(flags, limits, tmp, logs), report.save)
    record = report.record(rows, finished=True)
    print_table(record["rows"], device_type == "cuda")
    if device_type == "cuda" and args.preset == "debug":
        record["speedup_over_cpu"] = print_speedup(args, record["rows"])
    if record["rerun_ratio"] is not None:
        print(f"best setting re-run / first run: {record['rerun_ratio']:.3f} (the noise floor)")
    for name, t in record["targets"].items():
        print(verdict_line(name, t))
    if record["best"]:
        print(
            "best setting as config keys: "
            + " ".join(Setting(**record["best"]["setting"]).overrides())
        )
    for path in report.paths:
        write_json(path, record)
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="distrib-mfu-"))
    try:
        return run(args, overrides, tmp, start)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the running worker is killed with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
