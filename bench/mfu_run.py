"""bench/mfu.py's runner: each setting in a fresh `python -m bench.mfu_worker` process, under
a timeout that covers a cold compile for compiled settings, within a time budget and a deadline;
and the result JSON, rewritten after every row so a run killed midway leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.mfu_plan import Measure, Setting

ROOT = Path(__file__).resolve().parent.parent
# A compiled setting's timeout by default: the eager one plus this much for a cold Inductor
# compile (every block's forward and backward graphs, Triton kernels built from scratch).
COLD_COMPILE_S = 300.0
# Seconds kept back before --deadline-s for writing the JSON after the last worker.
DEADLINE_MARGIN_S = 5.0
# No setting starts with less than this left before the deadline (process start, imports).
MIN_START_S = 20.0


@dataclass
class Limits:
    """How long one setting may take and whether another may start.

    `setting_timeout` bounds an eager setting, `compile_timeout` a compiled one (process start,
    CUDA init and a cold compile before the first step). `budget_s`: no setting starts after
    that many seconds. `deadline_s`: the whole run ends by then; a setting's timeout is cut to
    what is left, and none starts with less left than `MIN_START_S` or than the quickest earlier
    setting of its kind (compiled or eager) took. 0 disables either.
    """

    setting_timeout: float
    compile_timeout: float
    budget_s: float = 0.0
    deadline_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    clock: Callable[[], float] = time.perf_counter

    def left(self) -> float:
        """Seconds left before the deadline less the margin (inf without a deadline)."""
        if not self.deadline_s:
            return float("inf")
        return self.deadline_s - (self.clock() - self.start) - DEADLINE_MARGIN_S

    def own_timeout(self, setting: Setting) -> float:
        return self.compile_timeout if setting.compile else self.setting_timeout

    def timeout(self, setting: Setting) -> float:
        return max(1.0, min(self.own_timeout(setting), self.left()))

    def refusal(self, setting: Setting, history: list[dict[str, Any]]) -> str | None:
        """Why `setting` must not start now (None: it may)."""
        if self.budget_s and self.clock() - self.start > self.budget_s:
            return f"--budget-s {self.budget_s:g} spent"
        if not self.deadline_s:
            return None
        kind = "compiled" if setting.compile else "eager"
        took = [
            r["process_s"]
            for r in history
            if r.get("status") == "ok" and r["setting"]["compile"] == setting.compile
        ]
        need = max(MIN_START_S, min(took, default=0.0))
        left = self.left()
        if left < need:
            return (
                f"--deadline-s {self.deadline_s:g}: {max(left, 0):.0f} s left, a {kind} setting "
                f"needs ~{need:.0f} s"
            )
        return None


def run_worker(cmd: list[str], log: Path, timeout: float) -> int | None:
    """Run `cmd` with its output in `log`; its return code, None when killed at `timeout`.
    The worker gets a session of its own, so on a timeout its children (Inductor's compile
    workers) are killed with it rather than left to load the machine."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        except BaseException:  # interrupted or terminated: leave no worker holding the GPU
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def measure_in_subprocess(
    worker_args: list[str], limits: Limits, tmp: Path, logs: Path | None = None
) -> Measure:
    """A `Measure` that runs each setting as `python -m bench.mfu_worker` with `worker_args`
    (config, steps, base overrides) and the setting's overrides; its output goes to
    `logs/row-<i>.log` (or into `tmp`)."""
    count = itertools.count()
    history: list[dict[str, Any]] = []

    def measure(setting: Setting, stage: str) -> dict[str, Any]:
        head = {"stage": stage, "setting": dataclasses.asdict(setting), "setting_obj": setting}
        reason = limits.refusal(setting, history)
        if reason:
            return head | {"status": "not_run", "reason": reason}
        i = next(count)
        out, timeout = tmp / f"row-{i}.json", limits.timeout(setting)
        log = (logs or tmp) / f"row-{i}.log"
        cmd = [sys.executable, "-m", "bench.mfu_worker", f"--out={out}", *worker_args]
        cmd += [f"--job.run_dir={tmp / f'run-{i}'}", *setting.overrides()]
        print(f"[{stage}] {setting.label()} (timeout {timeout:.0f} s)", flush=True)
        t0 = time.perf_counter()
        code = run_worker(cmd, log, timeout)
        took = {"process_s": time.perf_counter() - t0, "timeout_s": timeout, "log": str(log)}
        if code is None:
            cut = " (all --deadline-s left)" if timeout < limits.own_timeout(setting) else ""
            row = head | took | {"status": "timeout", "reason": f"over {timeout:.0f} s{cut}"}
            row["output_tail"] = tail(log)
        elif not out.is_file():  # killed, e.g. by the host's OOM killer (rc -9)
            row = head | took | {"status": "error", "reason": f"worker exited {code}: {tail(log)}"}
        else:
            row = head | json.loads(out.read_text()) | took
        history.append(row)
        shown = f"{row['tokens_per_s']:,.0f} tokens/s" if row["status"] == "ok" else row["reason"]
        print(f"    {row['status']} in {took['process_s']:.0f} s: {shown[:300]}", flush=True)
        return row

    return measure


def probe_environment(threads: int) -> dict[str, Any]:
    """The environment as a worker sees it (device name, versions), read in a child process,
    so on CUDA this process never creates a CUDA context that would take GPU memory from the
    workers."""
    cmd = [sys.executable, "-m", "bench.mfu_worker", "--probe", f"--threads={threads}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to `path` whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
