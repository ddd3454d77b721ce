"""Find ranks that hold the others up.

Collectives inside every step make all ranks' step times equal: a slow rank makes everyone wait
for it. So the signal is not a rank's step time but how late it becomes ready for the step's
first collective (data loaded, previous update applied) compared with the earliest rank: that lag
is time every other rank spends waiting. Each rank records a wall-clock timestamp when it is
ready; every `straggler_every` steps the timestamps and step times of all ranks are gathered, and
a rank whose mean lag exceeds `straggler_threshold` x the median step time is reported with its
rank and host. Hosts' clocks must agree to well under a step (NTP does); skew shows up as a
constant lag.
"""

from __future__ import annotations

import socket
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass
class StragglerMonitor:
    """Collects this rank's readiness times and step times; `check()` is collective."""

    every: int
    threshold: float
    rank: int
    host: str = field(default_factory=socket.gethostname)
    _ready: list[float] = field(default_factory=list)
    _step_s: list[float] = field(default_factory=list)

    def due(self, step: int) -> bool:
        return (
            self.every > 0
            and step % self.every == 0
            and dist.is_available()
            and dist.is_initialized()
        )

    def record(self, ready_at: float, step_s: float) -> None:
        """This rank was ready for the step at `ready_at` (time.time()) and it took `step_s`."""
        self._ready.append(ready_at)
        self._step_s.append(step_s)

    def check(self) -> dict[str, Any]:
        """Gather every rank's window; on rank 0 the summary and the stragglers, else {}."""
        mine = {"rank": self.rank, "host": self.host, "ready": self._ready, "step_s": self._step_s}
        self._ready, self._step_s = [], []
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if self.rank != 0:
            return {}
        return summarize(everyone, self.threshold)


def summarize(windows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Each rank's mean lag behind the earliest rank, and those lagging beyond the threshold."""
    steps = min(len(w["ready"]) for w in windows)
    earliest = [min(w["ready"][i] for w in windows) for i in range(steps)]
    median_step = statistics.median(s for w in windows for s in w["step_s"][:steps])
    ranks = []
    for w in windows:
        lag = statistics.fmean(w["ready"][i] - earliest[i] for i in range(steps))
        ranks.append(
            {
                "rank": w["rank"],
                "host": w["host"],
                "lag_s": lag,
                "step_s": statistics.fmean(w["step_s"][:steps]),
                "slowdown": lag / median_step if median_step > 0 else 0.0,
            }
        )
    return {
        "median_step_s": median_step,
        "max_lag_s": max(r["lag_s"] for r in ranks),
        "stragglers": [r for r in ranks if r["slowdown"] > threshold],
    }
