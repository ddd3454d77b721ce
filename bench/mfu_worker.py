"""One setting of bench/mfu.py, measured in a process of its own, so compile caches, CUDA
memory and peak statistics never carry over from another setting.

    python -m bench.mfu_worker --out ROW.json --config C [--warmup 3 --steps 10 --threads N]
                               [--section.key=value ...]
    python -m bench.mfu_worker --probe     # this machine's environment as one JSON line

The row (figures, or an `oom` / `error` row with the reason) goes to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, now, stamp
from bench.contenders import Run
from distrib.config import Config, load_config
from distrib.models.attention import resolve_backend
from distrib.train.metrics import flops_per_token, memory_stats, peak_tflops


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
    from distrib.train.trainer import Trainer

    runtime = init_runtime()
    device = runtime.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, runtime)
    engine, loader = trainer.engine, trainer.train_loader
    t1 = now(device)

    def step() -> torch.Tensor:
        # With the trainer's NaN / spike guard, as `distrib train` steps: its one read of the
        # loss and gradient norm per step is part of what training costs.
        return engine.train_step(loader.next_step(), accept=trainer.guard).loss

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--probe", action="store_true", help="print the environment as JSON")
    p.add_argument("--out", default=None, help="where the row's JSON goes")
    p.add_argument("--config", default=None, help="TOML config")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(environment(device)))
        return 0
    if not args.out or not args.config:
        p.error("--out and --config are needed (or --probe)")
    return worker(Path(args.out), args.config, overrides, args.warmup, args.steps)


if __name__ == "__main__":
    sys.exit(main())
