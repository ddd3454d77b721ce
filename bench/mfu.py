"""Throughput and MFU of distrib's training step over a matrix of settings.

Each setting is a set of config overrides (compile, attention backend, activation checkpointing,
micro-batch, chunked loss, float8) and runs in a fresh process: `Trainer(cfg, init_runtime())` as
`distrib train` builds it, `--warmup` untimed steps of `engine.train_step(train_loader.next_step())`
(compilation happens there), then `--steps` timed steps. Per setting it reports tokens/s from the
median step time, TFLOP/s and MFU (`distrib.metrics.flops_per_token`, attention included, over
`peak_tflops`), and peak memory (CUDA max allocated; peak RSS on a CPU).

The default plan is greedy, not the cartesian product: a baseline (the first value of every
axis), then one axis at a time varied from the best setting so far, then the best setting run
again in a fresh process as the figure to quote. `--full` runs the whole product instead.

    python bench/mfu.py                                   # debug preset (CPU or GPU)
    python bench/mfu.py --preset 1b                       # ~1B Llama, bf16, synthetic tokens
    python bench/mfu.py --preset 1b --micro-batch-sizes 2,4,8 --full
    python bench/mfu.py --axes compile,attention --steps 5 --warmup 2

Legend: B batch, L sequence (seq_len), G global batch (sequences per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python bench/mfu.py`

from bench.common import environment, latest_result, now, stamp, table, write_result  # noqa: E402
from bench.contenders import FOREIGN_MAX, Run  # noqa: E402
from bench.mfu_plan import (  # noqa: E402
    AXES,
    Context,
    Measure,
    Setting,
    axis_values,
    best_row,
    build_plan,
    run_plan,
)
from bench.throughput import ensure_data  # noqa: E402
from distrib.config import Config, load_config, to_dict  # noqa: E402
from distrib.errors import ConfigError  # noqa: E402
from distrib.metrics import flops_per_token, memory_stats, peak_tflops  # noqa: E402
from distrib.models.attention import resolve_backend  # noqa: E402

TARGET_MFU = 0.55  # the goal: the 1b preset on one H100
TARGET_NAME = "MFU >= 55% (1b preset, one H100)"

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

# --- one setting, in a fresh process -----------------------------------------------------------


def is_oom(err: BaseException | None) -> bool:
    """An out-of-memory error, also when wrapped (compile wraps what its graphs raise)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def step_seconds(device: torch.device, step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Time `steps` steps. On CUDA: an event after every step and one synchronization at each
    end of the window, so the queue of kernels never drains mid-window. On a CPU: the clock
    after every step, with the CPU that other processes used meanwhile."""
    losses = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        start = now(device)
        events[0].record()
        for i in range(steps):
            losses.append(step())
            events[i + 1].record()
        window = now(device) - start
        per_step = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:], strict=False)]
        return {"step_s": per_step, "clean_step_s": per_step, "window_s": window, "losses": losses}
    marks = [stamp(device)]
    for _ in range(steps):
        losses.append(step())
        marks.append(stamp(device))
    run = Run(marks, [])
    return {
        "step_s": run.step_seconds,
        "clean_step_s": run.clean_step_seconds(),
        "foreign_cpu_share": run.foreign_share,
        "window_s": run.seconds,
        "losses": losses,
    }


def measure_here(cfg: Config, warmup: int, steps: int) -> dict[str, Any]:
    """Build the trainer, warm up, time; the row's figures (raises on failure)."""
    from distrib.runtime import init_runtime
    from distrib.trainer import Trainer

    runtime = init_runtime()
    device = runtime.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, runtime)
    engine, loader = trainer.engine, trainer.train_loader
    t1 = now(device)

    def step() -> torch.Tensor:
        return engine.train_step(loader.next_step()).loss

    for _ in range(warmup):  # the first step compiles, when compile is on
        step()
    t2 = now(device)
    timing = step_seconds(device, step, steps)
    clean = timing["clean_step_s"]
    median = statistics.median(clean if len(clean) >= 3 else timing["step_s"])
    tokens = cfg.training.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_tflops(device, cfg.training.dtype, cfg.metrics.peak_tflops)
    tok_s = tokens / median
    tflops = tok_s * fpt / 1e12
    models = [m for part in getattr(engine, "parts", []) for m in part.modules()]
    return {
        "status": "ok",
        "tokens_per_s": tok_s,
        "tokens_per_s_whole_window": steps * tokens / timing["window_s"],
        "step_ms_median": 1e3 * median,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_tflops": peak,
        "flops_per_token": fpt,
        "tokens_per_step": tokens,
        "build_s": t1 - t0,
        "warmup_s": t2 - t1,
        "undisturbed_steps": len(clean),
        "losses": [float(x) for x in timing.pop("losses")],
        "attention_ran": resolve_backend(cfg.model.attention, device.type),
        # torchao swaps nn.Linear for Float8Linear: 0 means float8 was not applied.
        "float8_modules": sum("float8" in type(m).__name__.lower() for m in models),
        **memory_stats(device),
        **timing,
        "environment": environment(device),
    }


def worker(out: Path, config: str, overrides: list[str], warmup: int, steps: int) -> int:
    """Measure one setting and write its row to `out`; an OOM or error is a row too."""
    try:
        cfg = load_config(config, overrides)
        row = measure_here(cfg, warmup, steps)
    except Exception as err:  # noqa: BLE001 - every failure is a result of this setting
        oom = is_oom(err)
        row = {"status": "oom" if oom else "error", "reason": f"{type(err).__name__}: {err}"[:2000]}
        if not oom:
            row["traceback"] = traceback.format_exc()[-4000:]
        if torch.cuda.is_available():
            row["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out.write_text(json.dumps(row) + "\n")
    gc.collect()
    return 0


def measure_in_subprocess(args: argparse.Namespace, base: list[str], tmp: Path) -> Measure:
    """A `Measure` that runs each setting as `python bench/mfu.py --worker ...`."""
    start = time.perf_counter()
    count = itertools.count()

    def measure(setting: Setting, stage: str) -> dict[str, Any]:
        head = {"stage": stage, "setting": dataclasses.asdict(setting), "setting_obj": setting}
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            return head | {"status": "not_run", "reason": f"--budget-s {args.budget_s} spent"}
        i = next(count)
        out = tmp / f"row-{i}.json"
        flags = [f"--config={args.config_path}", f"--warmup={args.warmup}"]
        flags += [f"--steps={args.steps}", f"--threads={args.threads}"]
        run_dir = f"--job.run_dir={tmp / f'run-{i}'}"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            f"--worker={out}",
            *flags,
            *base,
            run_dir,
        ]
        cmd += setting.overrides()
        print(f"[{stage}] {setting.label()}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.setting_timeout)
        except subprocess.TimeoutExpired:
            return head | {"status": "timeout", "reason": f"over {args.setting_timeout} s"}
        if not out.is_file():  # killed, e.g. by the host's OOM killer (rc -9)
            tail = (proc.stderr or proc.stdout)[-1500:]
            return head | {"status": "error", "reason": f"worker exited {proc.returncode}: {tail}"}
        row = head | json.loads(out.read_text()) | {"process_s": time.perf_counter() - t0}
        shown = f"{row['tokens_per_s']:,.0f} tokens/s" if row["status"] == "ok" else row["reason"]
        print(f"    {row['status']}: {shown[:300]}", flush=True)
        return row

    return measure


# --- report ------------------------------------------------------------------------------------


def fmt(row: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    value = row.get(key)
    return "-" if value is None else format(scale * value, spec)


def print_table(rows: list[dict[str, Any]], cuda: bool) -> None:
    header = [
        "stage",
        "compile",
        "attn",
        "chunk",
        "fp8",
        "AC",
        "mb",
        "status",
        "tokens/s",
        "step ms",
        "TFLOP/s",
        "MFU",
        "mem GB" if cuda else "RSS GB",
    ]
    lines = [header]
    for r in rows:
        cells = Setting(**r["setting"]).cells()
        ok = r["status"] == "ok"
        mem = r.get("memory_gb") if ok or cuda else None
        lines.append(
            [
                r["stage"],
                *cells,
                r["status"],
                fmt(r, "tokens_per_s", ",.0f") if ok else "-",
                fmt(r, "step_ms_median", ".1f") if ok else "-",
                fmt(r, "tflops", ".3g") if ok else "-",
                fmt(r, "mfu", ".1f", 100) + ("%" if r.get("mfu") else "") if ok else "-",
                "-" if mem is None else f"{mem:.2f}",
            ]
        )
    print(table(lines))
    for r in rows:
        if r["status"] not in ("ok",):
            print(
                f"  {r['stage']} {Setting(**r['setting']).label()}: {r['status']}: "
                f"{r.get('reason', '')[:300]}"
            )


def speedup_over_cpu(rows: list[dict[str, Any]], cpu: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of each GPU row over the CPU row of the same setting, and best over best."""
    cpu_rows = {
        json.dumps(r["setting"], sort_keys=True): r
        for r in cpu["rows"]
        if r["status"] == "ok" and r["stage"] != "best"
    }
    per = []
    for r in rows:
        c = cpu_rows.get(json.dumps(r["setting"], sort_keys=True))
        if r["status"] == "ok" and c and r["stage"] != "best":
            per.append(
                {
                    "setting": r["setting"],
                    "gpu_tokens_per_s": r["tokens_per_s"],
                    "cpu_tokens_per_s": c["tokens_per_s"],
                    "speedup": r["tokens_per_s"] / c["tokens_per_s"],
                }
            )
    gpu_best, cpu_best = quoted_best(rows), cpu.get("best")
    best = None
    if gpu_best and cpu_best:
        best = gpu_best["tokens_per_s"] / cpu_best["tokens_per_s"]
    return {"per_setting": per, "best_over_best": best}


def rerun_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The best setting's re-run over its first run: how far the same setting moves between
    two fresh processes, i.e. the noise that differences between rows must exceed."""
    again, first = quoted_best(rows), best_row(rows)
    if again is None or first is None or again["stage"] != "best":
        return None
    return again["tokens_per_s"] / first["tokens_per_s"]


def quoted_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The figure to quote: the best setting's fresh re-run (no winner's curse from picking
    the maximum of noisy rows), or the best row where that re-run did not happen."""
    again = [r for r in rows if r["stage"] == "best" and r["status"] == "ok"]
    return again[-1] if again else best_row(rows)


def target(preset: str, device: torch.device, name: str, best: dict[str, Any] | None) -> dict:
    applies = preset == "1b" and device.type == "cuda"
    mfu = best.get("mfu") if best else None
    return {
        TARGET_NAME: {
            "threshold": TARGET_MFU,
            "mfu": mfu,
            "applicable": applies,
            "on_h100": "H100" in name,
            "pass": (mfu is not None and mfu >= TARGET_MFU) if applies else None,
            "note": None if applies else "only the 1b preset on a CUDA GPU is judged",
        }
    }


# --- main --------------------------------------------------------------------------------------


def result_kind(preset: str) -> str:
    """The JSON's name stem: `mfu` for the debug preset (the file the GPU-over-CPU speed-up is
    read from), `mfu-<preset>` for the others, so two presets run on one day keep both files."""
    return "mfu" if preset == "debug" else f"mfu-{preset}"


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
    p.add_argument("--setting-timeout", type=float, default=1200, help="seconds per setting")
    p.add_argument("--compare-cpu", default=None, help="CPU mfu JSON (default: newest committed)")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    preset = PRESETS[args.preset]
    args.config_path = str(args.config or ROOT / preset["config"])
    args.mbs = [int(m) for m in (args.micro_batch_sizes or preset["mbs"]).split(",")]
    args.chunk = args.loss_chunk_tokens or preset["chunk"]
    args.axis_list = [a.strip() for a in args.axes.split(",") if a.strip()]
    unknown = set(args.axis_list) - set(AXES)
    if unknown:
        p.error(f"unknown axes {sorted(unknown)}; valid: {', '.join(AXES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(Path(args.worker), args.config_path, overrides, args.warmup, args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="distrib-mfu-"))
    try:
        base = [*PRESETS[args.preset]["overrides"], *overrides]
        if args.preset == "1b":
            base.insert(len(PRESETS["1b"]["overrides"]), f"--data.dir={tmp / 'synthetic'}")
        cfg = load_config(args.config_path, base)
        # CUDA is only touched by the workers until they are done, so each has the whole GPU.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = ensure_data(cfg, args.preset, args.warmup + args.steps)
        ctx = Context.detect(device.type, cfg.training.dtype, cfg.training.global_batch_size)
        plan = build_plan(axis_values(args.mbs, args.chunk, args.axis_list), ctx, args.full)
        print(
            f"{device}; preset {args.preset}; {args.warmup} warmup + {args.steps} timed steps; "
            f"{'full product' if args.full else 'greedy plan'}; data {data}",
            flush=True,
        )
        rows = run_plan(plan, ctx, measure_in_subprocess(args, base, tmp))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r.pop("setting_obj", None)
    env = next((r.pop("environment") for r in rows if "environment" in r), environment(device))
    for r in rows:
        r.pop("environment", None)
    best = quoted_best(rows)
    print_table(rows, device.type == "cuda")
    record: dict[str, Any] = {
        "environment": env,
        "gpu_name": env["device_name"] if device.type == "cuda" else None,
        "preset": args.preset,
        "data": data,
        "protocol": {
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "plan": "full product"
            if args.full
            else "greedy: baseline, one axis at a time "
            "from the best so far, then the best again in a fresh process",
            "process_per_setting": True,
            "tokens_per_s": "tokens per step / median step time (CUDA: events, one sync at "
            f"each end of the window; CPU: steps where other processes used < {FOREIGN_MAX:.0%}"
            " of a core, all steps when fewer than 3)",
            "flops": "distrib.metrics.flops_per_token (attention included, causal mask not "
            "discounted, recomputation not counted)",
        },
        "axes": axis_values(args.mbs, args.chunk, args.axis_list),
        "plan": [dataclasses.asdict(s) for s in plan] if not args.full else "full",
        "config": to_dict(cfg),
        "rerun_ratio": rerun_ratio(rows),
        "rows": rows,
        "best": best,
        "targets": target(args.preset, device, env["device_name"], best),
    }
    if device.type == "cuda" and args.preset == "debug":
        found = (
            (Path(args.compare_cpu), json.loads(Path(args.compare_cpu).read_text()))
            if (args.compare_cpu)
            else latest_result("mfu", torch.device("cpu"))
        )
        if found:
            record["speedup_over_cpu"] = {"cpu_result": str(found[0])} | speedup_over_cpu(
                rows, found[1]
            )
            for s in record["speedup_over_cpu"]["per_setting"]:
                print(f"GPU/CPU {Setting(**s['setting']).label()}: {s['speedup']:.1f}x")
            print(f"GPU best / CPU best: {record['speedup_over_cpu']['best_over_best']}")
    if record["rerun_ratio"] is not None:
        print(f"best setting re-run / first run: {record['rerun_ratio']:.3f} (the noise floor)")
    for name, t in record["targets"].items():
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"{name}: {verdict} (best MFU {t['mfu']})")
    if best:
        print("best setting as config keys: " + " ".join(Setting(**best["setting"]).overrides()))
    if not args.no_write:
        print(f"wrote {write_result(result_kind(args.preset), device, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
