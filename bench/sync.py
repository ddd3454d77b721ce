"""Loss against step and against bytes communicated: every-step sync, local SGD and DiLoCo.

    python -m bench.sync                              # 4 modes x 100 steps: ~10-15 min, 2 cores
    python -m bench.sync --steps 200 --sync-every 16  # longer runs, rarer synchronization
    python -m bench.sync --modes every_step diloco --out /tmp/sync   # runs and report there

The debug model (configs/debug.toml) trains under `launch/train.sh` as fault-tolerant replica
groups (`parallel.fault_tolerance = true`, `parallel.dp_replicate = --groups`, one CPU process
each, `min_replica_groups` = all of them so that every group is in every quorum from the first
step), once per synchronization mode, each with a torchft lighthouse of its own on a free port,
on the same data with the same seed:

| mode | overrides |
| --- | --- |
| `every_step` | `training.sync = every_step`: gradients averaged over the groups every step |
| `local_sgd` | `training.sync = local_sgd`, `sync_every = H`: parameters averaged every H steps |
| `diloco` | `training.sync = diloco`, `sync_every = H`: an outer Nesterov step every H steps |
| `diloco_overlapped` | the same with `sync_delay = D`: the average is applied D steps late, the exchange hidden behind D inner steps |

Every step is logged (`metrics.log_every = 1`) with `sync_bytes`, the bytes each rank has
all-reduced between groups so far. Per mode the table shows the loss (the mean of the groups'
at each step: each trains on its half of the global batch) at the last step, its mean over the
last 10 steps, at a few steps on the way, the bytes per rank in all and per step (and their
ratio to every-step sync's), the wall time of the launch (processes, lighthouse and the final
checkpoint included) and of training alone (`elapsed_s`), and how many cores other processes
kept busy meanwhile (on a 2-core machine anything above ~0.1 slows the run). The JSON (bench/results/sync-cpu-<date>.json, and `--out` too) holds
every mode's per-step curve (step, loss, sync_bytes). The run folders go to `--out`
(default runs/bench-sync/<mode>, replaced on every run), and `distrib report` of all of them to
`--out`/report: its sync.png draws loss vs step and vs bytes communicated, one line per mode.
Arguments `--section.key=value` are config overrides for every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, environment, table, write_result
from distrib.commands.report import write_report
from distrib.commands.report_runs import load_runs
from distrib.commands.report_sync import SyncCurve, sync_curves
from distrib.config import load_config
from distrib.data.prepare import prepare_dataset
from distrib.data.shards import MANIFEST_FILE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/debug.toml"
MODES = ("every_step", "local_sgd", "diloco", "diloco_overlapped")
# Variables by which a launcher around this process would describe its own processes; the
# launches must not inherit them (as tests/launch/conftest.py's launch_env).
_LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "TORCHELASTIC_")
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
_LAUNCHER_VARS |= {"MASTER_ADDR", "MASTER_PORT", "NGPU", "NNODES", "NODE_RANK", "NP"}
_LAUNCHER_VARS |= {"RDZV_ENDPOINT", "CONFIG", "MAX_RESTARTS", "LOG_DIR", "MPIRUN"}
_LAUNCHER_VARS |= {"TORCHFT_LIGHTHOUSE", "REPLICA_GROUP", "DISTRIB_REPLICA_GROUP"}
_LAUNCHER_VARS |= {"LIGHTHOUSE_PORT"}
LAST = 10  # steps in the "last steps" mean of the loss


def mode_overrides(mode: str, every: int, delay: int) -> list[str]:
    """The config overrides of one synchronization mode."""
    if mode == "every_step":
        return ["--training.sync=every_step"]
    if mode == "local_sgd":
        return ["--training.sync=local_sgd", f"--training.sync_every={every}"]
    extra = [f"--training.sync_delay={delay}"] if mode == "diloco_overlapped" else []
    return ["--training.sync=diloco", f"--training.sync_every={every}", *extra]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """What every mode runs: the groups, the steps, every step logged, no evaluation."""
    return [
        "--parallel.fault_tolerance=true",
        f"--parallel.dp_replicate={args.groups}",
        f"--parallel.min_replica_groups={args.groups}",
        f"--training.steps={args.steps}",
        f"--training.warmup_steps={max(1, args.steps // 10)}",
        "--training.eval_every=0",
        "--checkpoint.interval=0",  # only the final checkpoint (0 is a multiple of any H)
        "--metrics.log_every=1",
        "--metrics.progress=false",
        "--metrics.tensorboard=false",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(groups: int) -> dict[str, str]:
    """This environment without any launcher's variables; one CPU process per group, one
    thread each, and a lighthouse port of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARS and not key.startswith(_LAUNCHER_PREFIXES)
    }
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NGPU": str(groups)}
    return env | {"LIGHTHOUSE_PORT": str(free_port()), "CONFIG": CONFIG}


def fresh_run_dir(run_dir: Path) -> None:
    """Remove an earlier run of this benchmark there (it would resume from its checkpoint);
    refuse to remove anything else."""
    if not run_dir.exists():
        return
    ours = {"console.log", "lighthouse.log"}
    names = {p.name for p in run_dir.iterdir()}
    if not all(n in ours or n.startswith("group") for n in names):
        sys.exit(f"bench.sync: {run_dir} holds something else than a run of this benchmark")
    shutil.rmtree(run_dir)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the launches)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _machine_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_mode(
    run_dir: Path, overrides: list[str], groups: int, timeout: float
) -> tuple[float, float | None]:
    """One launch of `launch/train.sh`; returns its wall time and the cores that other
    processes (not this one, not the launch's) kept busy meanwhile, on average. Its console
    goes to `<run_dir>/console.log`."""
    fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True)
    cmd = ["bash", "launch/train.sh", f"--job.run_dir={run_dir}", *overrides]
    machine, own = _machine_cpu_seconds(), _own_cpu_seconds()
    start = time.perf_counter()
    with (run_dir / "console.log").open("w") as log:
        done = subprocess.run(
            cmd, cwd=ROOT, env=launch_env(groups), stdout=log, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - start
    after = _machine_cpu_seconds()
    others = None
    if machine is not None and after is not None:
        others = max(0.0, (after - machine) - (_own_cpu_seconds() - own)) / wall
    if done.returncode != 0:
        tail = (run_dir / "console.log").read_text(errors="replace")[-3000:]
        sys.exit(f"bench.sync: {run_dir.name} failed (exit {done.returncode}):\n{tail}")
    return wall, others


def ensure_data(overrides: list[str]) -> str:
    """Prepare the config's dataset if it is missing; returns what the data is."""
    cfg = load_config(str(ROOT / CONFIG), overrides)
    data_dir = Path(cfg.data.dir) if Path(cfg.data.dir).is_absolute() else ROOT / cfg.data.dir
    if not (data_dir / MANIFEST_FILE).is_file():
        print(f"no prepared dataset in {cfg.data.dir}: preparing it", flush=True)
        cwd = Path.cwd()
        os.chdir(ROOT)  # data.dir is relative to the repository root, as for launch/train.sh
        try:
            prepare_dataset(cfg.data, cfg.model.vocab_size, cfg.training.seed)
        finally:
            os.chdir(cwd)
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    return f"{cfg.data.dir}: {manifest.get('source', '')}"


def figures(curve: SyncCurve, checkpoints: list[int], wall_s: float, elapsed: float | None):
    """One mode's figures for the table and the JSON."""
    tail = curve.loss[-LAST:]
    return {
        **curve.summary(),
        "label": curve.label,
        f"loss_last{LAST}_mean": sum(tail) / len(tail) if tail else None,
        "loss_at": {str(s): curve.loss_at(s) for s in checkpoints},
        "wall_s": wall_s,
        "train_s": elapsed,
        "curve": [
            {"step": s, "loss": loss, "sync_bytes": sent}
            for s, loss, sent in zip(curve.steps, curve.loss, curve.sync_bytes, strict=True)
        ],
    }


def last_elapsed(run_dir: Path) -> float | None:
    """The longest of the groups' last `elapsed_s`: training time without start-up."""
    times = [r.wall_time_s for r in load_runs(run_dir) if r.wall_time_s is not None]
    return max(times) if times else None


def _shown(path: Path) -> str:
    """`path` relative to the repository root where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: dict[str, dict[str, Any]], checkpoints: list[int]) -> None:
    base = results.get("every_step", {}).get("sync_bytes_per_step")
    header = ["mode", "sync", "H", "delay", "final loss", f"last {LAST}"]
    header += [f"loss@{s}" for s in checkpoints]
    header += ["sync MB/rank", "MB/step", "vs every_step", "wall s", "train s", "others"]
    rows = [header]
    for mode, r in results.items():
        per_step = r["sync_bytes_per_step"]
        ratio = per_step / base if base and per_step is not None else None
        rows.append(
            [
                mode,
                r["sync"] or "n/a",
                "-" if r["sync_every"] is None else str(r["sync_every"]),
                "-" if r["sync_delay"] is None else str(r["sync_delay"]),
                _fmt(r["final_loss"], ".4f"),
                _fmt(r[f"loss_last{LAST}_mean"], ".4f"),
                *[_fmt(r["loss_at"][str(s)], ".4f") for s in checkpoints],
                _fmt(None if r["sync_bytes"] is None else r["sync_bytes"] / 1e6, ",.1f"),
                _fmt(None if per_step is None else per_step / 1e6, ".3f"),
                _fmt(ratio, ".3f"),
                f"{r['wall_s']:.0f}",
                _fmt(r["train_s"], ".0f"),
                _fmt(r["others_cores"], ".2f"),
            ]
        )
    print(table(rows))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: `--section.key=value` overrides pass through untouched.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=100, help="training steps per mode")
    p.add_argument("--groups", type=int, default=2, help="replica groups (one process each)")
    p.add_argument("--sync-every", type=int, default=8, help="H of local SGD and DiLoCo")
    p.add_argument("--sync-delay", type=int, default=4, help="diloco_overlapped's sync_delay")
    p.add_argument("--timeout-s", type=float, default=1800, help="per mode")
    p.add_argument(
        "--out", default="runs/bench-sync", help="run folders, report, and a copy of the JSON"
    )
    args, overrides = p.parse_known_args(argv)
    if args.steps < 1 or args.groups < 2 or args.sync_every < 1:
        p.error("--steps must be >= 1, --groups >= 2, --sync-every >= 1")
    if not 0 < args.sync_delay < args.sync_every:
        p.error(f"--sync-delay must be in [1, --sync-every - 1 = {args.sync_every - 1}]")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    common = [*common_overrides(args), *extra]
    data = ensure_data(common)
    checkpoints = sorted({max(1, args.steps * q // 4) for q in (1, 2, 3)})
    results: dict[str, dict[str, Any]] = {}
    run_dirs = []
    for mode in args.modes:
        overrides = [*common, *mode_overrides(mode, args.sync_every, args.sync_delay)]
        print(f"{mode}: {args.steps} steps, {args.groups} replica groups ...", flush=True)
        wall, others = run_mode(out / mode, overrides, args.groups, args.timeout_s)
        run_dirs.append(out / mode)
        curves = sync_curves(load_runs(out / mode))
        if not curves:
            sys.exit(f"bench.sync: {out / mode} logged no sync_bytes")
        results[mode] = {"overrides": overrides}
        results[mode] |= figures(curves[0], checkpoints, wall, last_elapsed(out / mode))
        results[mode]["others_cores"] = others
        busy = "" if others is None else f", other processes used {others:.2f} cores"
        print(f"  {wall:.0f} s, final loss {results[mode]['final_loss']:.4f}{busy}", flush=True)
    report = write_report(run_dirs, out / "report")
    print_table(results, checkpoints)
    device = torch.device("cpu")
    record = {
        "environment": environment(device),
        "config": CONFIG,
        "data": data,
        "protocol": {
            "steps": args.steps,
            "groups": args.groups,
            "processes_per_group": 1,
            "threads_per_process": 1,
            "sync_every": args.sync_every,
            "sync_delay": args.sync_delay,
            "common_overrides": common,
            "loss": "mean over the replica groups at each step (each trains on 1/groups of the "
            "global batch)",
            "sync_bytes": "bytes one rank all-reduced between groups, cumulative",
            "wall_s": "launch/train.sh start to exit: processes, lighthouse, final checkpoint",
            "train_s": "the longest of the groups' last elapsed_s",
            "others_cores": "CPU seconds other processes used during the launch (machine's, "
            "from /proc/stat, minus this process's and the launch's) over its wall time",
            "checkpoints": checkpoints,
        },
        "modes": results,
        "report": _shown(out / "report" / "sync.png"),
        "seconds": time.perf_counter() - start,
    }
    path = write_result("sync", device, record)
    print(f"wrote {path}")
    if out.resolve() != RESULTS_DIR.resolve():
        copy = out / path.name
        copy.write_text(path.read_text())
        print(f"wrote {copy}")
    print(f"wrote {len(report)} report files to {out / 'report'} (sync.png: the comparison)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
