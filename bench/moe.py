"""Mixture-of-Experts: training tokens/s of an MoE model against the dense model with the same
active parameters, and per-rank memory under expert parallelism.

    python -m bench.moe                                  # CPU: ~25 s on 2 idle cores
    python -m bench.moe --parts throughput --repeats 5   # the tokens/s rows only
    python -m bench.moe --preset gpu                     # one GPU, bf16: grouped_mm, loop, dense
    python -m bench.moe --preset gpu --deadline-s 120 --out DIR
    python -m bench.moe --model.moe_experts=16           # any config override

Throughput: each contender is built in this process as `distrib train` builds it
(`build_engine`, one process) and timed on `engine.train_step` (forward, backward, clipping,
AdamW) over uniform random tokens: `--warmup` untimed steps, then `--steps` timed ones, the
contenders interleaved over `--repeats` (A B C A B C ...). The dense twin has the MoE model's
shapes with one SwiGLU of width (top_k + shared) x moe_ffn_dim, so a token multiplies by the
same weights (`active_matmul_params`) but for the router's. The MoE runs with
`moe_kernel=loop` (one matmul per expert) and, where `torch._grouped_mm` runs (CUDA sm90+,
bfloat16), with `grouped_mm`.

Memory (`bench/moe_memory.py`): per-rank bytes under ep = 1, 2, 4 on dp_shard = 4 gloo
processes, experts apart from the rest. The figures and table: `bench/moe_figures.py`.

Writes bench/results/moe-<device>-<date>.json (`--out DIR` too; `--dry-run`: DIR only).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import moe_memory
from bench.common import RESULTS_DIR, device_slug, environment, table
from bench.mfu_worker import is_oom, step_seconds
from bench.moe_figures import contender_figures, ratios, throughput_table, tokens_per_s
from distrib.config import Config, ModelConfig, load_config, to_dict
from distrib.data.loader import Batch
from distrib.errors import ConfigError
from distrib.models.moe import grouped_mm_available
from distrib.train.metrics import active_matmul_params

SHAPE = ["--model.tie_embeddings=false", "--model.family=custom", "--model.moe_top_k=2"]
PRESETS = {
    # 2.3M parameters (0.86M active matmul weights), 1024 tokens a step: ~0.1 s a step on 2 cores.
    "cpu": [
        *SHAPE,
        *("--model.dim=128", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2"),
        *("--model.vocab_size=2048", "--model.max_seq_len=128", "--data.seq_len=128"),
        *("--model.moe_experts=8", "--model.moe_ffn_dim=128", "--model.ffn_dim=256"),
        *("--training.global_batch_size=8", "--training.micro_batch_size=8"),
    ],
    # ~0.5B parameters (0.1B active; Qwen3-MoE-like: 32 experts, top-4), bf16, 16k tokens a step.
    "gpu": [
        *SHAPE[:2],
        *("--model.dim=1024", "--model.n_layers=8", "--model.n_heads=16", "--model.n_kv_heads=4"),
        *("--model.vocab_size=32000", "--model.max_seq_len=2048", "--data.seq_len=2048"),
        *("--model.moe_experts=32", "--model.moe_top_k=4", "--model.moe_ffn_dim=512"),
        *("--model.ffn_dim=2048", "--training.dtype=bfloat16"),
        *("--training.global_batch_size=8", "--training.micro_batch_size=4"),
    ],
}
GROUPED_MM_NEEDS = "torch._grouped_mm needs a CUDA GPU of compute capability 9.0+ and bfloat16"


@dataclass
class Contender:
    """One model to time: a config, or the reason it cannot run here."""

    name: str
    cfg: Config
    skipped: str | None = None


# --- the dense twin ------------------------------------------------------------------------------


def twin_ffn_dim(model: ModelConfig) -> int:
    """The dense SwiGLU width that costs a token what the routed experts cost it."""
    return (model.moe_top_k + model.moe_shared_experts) * (model.moe_ffn_dim or model.ffn_dim)


def dense_twin_flags(model: ModelConfig) -> list[str]:
    """Overrides that turn the MoE model into its dense twin (same active matmul weights but
    the router's). Its leading dense blocks (moe_dense_layers) must already have that width,
    since a dense model has one ffn_dim."""
    width = twin_ffn_dim(model)
    if model.moe_dense_layers and model.ffn_dim != width:
        raise ConfigError(
            f"model.moe_dense_layers = {model.moe_dense_layers} keeps blocks of ffn_dim "
            f"{model.ffn_dim}; the dense twin needs ffn_dim = (moe_top_k + moe_shared_experts) x "
            f"moe_ffn_dim = {width} there too: set model.ffn_dim={width} or moe_dense_layers=0"
        )
    return ["--model.moe_experts=0", f"--model.ffn_dim={width}"]


def router_params(model: ModelConfig) -> int:
    """The routers' weights: what the MoE model's active matmul weights have over its twin's."""
    return (model.n_layers - model.moe_dense_layers) * model.dim * model.moe_experts


def active_params(moe: ModelConfig, dense: ModelConfig) -> dict[str, Any]:
    """Both models' active matmul weights; they must differ by the routers exactly."""
    counts = {
        "moe": active_matmul_params(moe),
        "dense": active_matmul_params(dense),
        "router": router_params(moe),
    }
    counts["matched"] = counts["moe"] - counts["router"] == counts["dense"]
    return counts


# --- contenders ----------------------------------------------------------------------------------


def build_contenders(args: argparse.Namespace, overrides: list[str]) -> list[Contender]:
    """MoE with grouped_mm (skipped where it cannot run), MoE with the loop, the dense twin."""
    base = [*PRESETS[args.preset], *overrides]
    moe = load_config(None, [*base, "--model.moe_kernel=loop"])
    if moe.model.moe_experts == 0:
        raise ConfigError("bench.moe needs an MoE model: model.moe_experts must be > 0")
    dense = load_config(None, [*base, *dense_twin_flags(moe.model)])
    grouped = load_config(None, [*base, "--model.moe_kernel=grouped_mm"])
    ok = _grouped_mm_runs(grouped)
    return [
        Contender("moe_grouped_mm", grouped, None if ok else GROUPED_MM_NEEDS),
        Contender("moe_loop", moe),
        Contender("dense", dense),
    ]


def _grouped_mm_runs(cfg: Config) -> bool:
    if not torch.cuda.is_available() or cfg.training.dtype != "bfloat16":
        return False
    return grouped_mm_available(torch.empty(0, device="cuda", dtype=torch.bfloat16))


def random_steps(cfg: Config, count: int) -> list[list[Batch]]:
    """`count` steps of uniform random tokens, each split into the config's micro-batches."""
    t = cfg.training
    g = torch.Generator().manual_seed(t.seed)
    shape = (t.global_batch_size, cfg.data.seq_len + 1)
    steps = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
        micro = torch.split(tokens, t.micro_batch_size)
        steps.append([Batch(m[:, :-1].contiguous(), m[:, 1:].contiguous()) for m in micro])
    return steps


# --- timing --------------------------------------------------------------------------------------


def time_contender(c: Contender, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Build the engine, warm up, time; the run's figures (or an `oom` / `error` run)."""
    from distrib.engines.build import build_engine
    from distrib.runtime import Runtime, detect_launch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        engine, _, _ = build_engine(c.cfg, Runtime(detect_launch(), device))
        batches = random_steps(c.cfg, 4)
        counter = iter(range(10**9))

        def step() -> torch.Tensor:
            return engine.train_step(batches[next(counter) % len(batches)]).loss

        for _ in range(warmup):
            step()
        run = step_seconds(device, step, steps)
        run["total_params"] = sum(p.numel() for part in engine.parts for p in part.parameters())
    except Exception as err:  # noqa: BLE001 - a failed run is a result of this contender
        run = {"status": "oom" if is_oom(err) else "error", "reason": f"{err}"[:2000]}
        run["traceback"] = traceback.format_exc()[-3000:]
    else:
        run["status"] = "ok"
        run["losses"] = [float(x) for x in run["losses"]]
    run["seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        run["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    engine = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


class Deadline:
    """Starts no run that the slowest earlier run of its contender says cannot finish."""

    def __init__(self, seconds: float, start: float) -> None:
        self.seconds, self.start = seconds, start
        self.longest: dict[str, float] = {}

    def allows(self, name: str) -> bool:
        if not self.seconds:
            return True
        left = self.seconds - (time.perf_counter() - self.start)
        return left > max(10.0, 1.2 * self.longest.get(name, max(self.longest.values(), default=0)))

    def record(self, name: str, seconds: float) -> None:
        self.longest[name] = max(seconds, self.longest.get(name, 0.0))


def interleave(
    contenders: list[Contender], args: argparse.Namespace, device: torch.device, clock: Deadline
) -> dict[str, list[dict[str, Any]]]:
    """Every runnable contender once per repeat, in turn; each run in the JSON."""
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders if not c.skipped}
    for repeat in range(args.repeats):
        for c in (c for c in contenders if not c.skipped):
            if not clock.allows(c.name):
                runs[c.name].append({"status": "not_run", "reason": "deadline"})
                continue
            run = time_contender(c, device, args.warmup, args.steps)
            clock.record(c.name, run["seconds"])
            runs[c.name].append(run)
            print(f"  repeat {repeat + 1}/{args.repeats} {c.name}: {_brief(run, c)}", flush=True)
    return runs


def _brief(run: dict[str, Any], c: Contender) -> str:
    if run["status"] != "ok":
        return f"{run['status']}: {run.get('reason', '')[:200]}"
    tokens = c.cfg.training.global_batch_size * c.cfg.data.seq_len
    return f"{tokens_per_s(run, tokens):,.0f} tokens/s"


def run_throughput(args: argparse.Namespace, overrides: list[str], clock: Deadline) -> dict:
    """The throughput part: contenders, interleaved runs, figures, printed table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    contenders = build_contenders(args, overrides)
    moe, dense = contenders[1].cfg.model, contenders[2].cfg.model
    counts = active_params(moe, dense)
    print(
        f"active matmul weights: MoE {counts['moe']:,} (routers {counts['router']:,}), "
        f"dense twin {counts['dense']:,} (ffn_dim {dense.ffn_dim}): "
        f"{'matched' if counts['matched'] else 'NOT matched'} but for the routers",
        flush=True,
    )
    assert counts["matched"], counts
    runs = interleave(contenders, args, device, clock)
    figures = {
        c.name: contender_figures(c.cfg, c.skipped, runs.get(c.name, []), device)
        for c in contenders
    }
    print(throughput_table(figures, device.type == "cuda"))
    out = {"active_params": counts, "contenders": figures, "ratios": ratios(figures)}
    for name, r in out["ratios"].items():
        paired = "n/a" if r["paired_median"] is None else f"{r['paired_median']:.3f}"
        print(f"{name}: {r['of_medians']:.3f} (medians), {paired} (median of paired repeats)")
    out["config"] = to_dict(contenders[1].cfg)
    return out


def run_memory(args: argparse.Namespace, clock: Deadline) -> dict[str, Any]:
    """The memory part: one gloo group for every ep, a row per ep, the 1/ep check."""
    out: dict[str, Any] = {"world": args.memory_world, "model": moe_memory.MODEL}
    if not clock.allows("memory"):
        return out | {"status": "not_run", "reason": "deadline"}
    ranks = moe_memory.measure(args.memory_eps, args.memory_world)
    rows = [moe_memory.summary(ep, ranks[ep]) for ep in args.memory_eps]
    print(f"per-rank bytes, dp_shard = {args.memory_world}, {moe_memory.DESCRIPTION}:")
    print(table(moe_memory.table_rows(rows)))
    scale = moe_memory.scaling(rows)
    print("\n".join(moe_memory.scaling_lines(scale)))
    out |= {"rows": rows, "scaling": scale, "ranks": {f"ep={ep}": r for ep, r in ranks.items()}}
    return out


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: `--section.key=value` overrides pass through untouched.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="default: the device's")
    p.add_argument("--parts", default="throughput,memory", help="throughput, memory or both")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per contender")
    p.add_argument("--memory-eps", default="1,2,4", help="ep degrees of the memory part")
    p.add_argument("--memory-world", type=int, default=4, help="processes (= dp_shard)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--deadline-s", type=float, default=0, help="end within N s (0: no limit)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--dry-run", action="store_true", help="rehearsal: JSON into --out only")
    args, overrides = p.parse_known_args(argv)
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    args.part_list = [s.strip() for s in args.parts.split(",") if s.strip()]
    args.memory_eps = [int(e) for e in args.memory_eps.split(",")]
    if set(args.part_list) - {"throughput", "memory"} or not args.part_list:
        p.error(f"--parts takes throughput, memory or both, got '{args.parts}'")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    return args, overrides


def result_paths(args: argparse.Namespace) -> list[Path]:
    """bench/results (not with --dry-run) and --out; a rehearsal's name says dryrun."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = f"dryrun-{device_slug(device)}" if args.dry_run else device_slug(device)
    name = f"moe-{slug}-{datetime.date.today().isoformat()}.json"
    dirs = ([] if args.dry_run else [RESULTS_DIR]) + ([Path(args.out)] if args.out else [])
    return [d / name for d in dirs]


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "deadline_s": args.deadline_s,
        "tokens": "uniform random, in this process (no loader)",
        "tokens_per_s": "tokens per step / median step time (CUDA: events; CPU: steps where "
        "other processes used < 5% of a core, all steps when fewer than 3), median over the "
        "repeats with >= 3 such steps (over all repeats when none has)",
        "dense_twin": "moe_experts=0, ffn_dim = (moe_top_k + moe_shared_experts) x moe_ffn_dim",
    }


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Deadline(args.deadline_s, start)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record: dict[str, Any] = {"benchmark": "moe", "date": datetime.date.today().isoformat()}
    record |= {"environment": environment(device), "preset": args.preset, "dry_run": args.dry_run}
    record["protocol"] = protocol(args)
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "throughput": lambda: run_throughput(args, overrides, clock),
        "memory": lambda: run_memory(args, clock),
    }
    try:
        for name in args.part_list:
            record[name] = parts[name]()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    record["seconds"] = time.perf_counter() - start
    for path in result_paths(args):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
