"""Stop cleanly on SIGTERM or SIGUSR1: finish the current step, save a checkpoint, exit 0.

Slurm sends SIGTERM on preemption and, with `#SBATCH --signal=USR1@N`, SIGUSR1 N seconds before
the time limit. A signal may reach only some ranks (or reach them at different steps), so after
each step every rank shares whether it has one; all stop at the same step boundary, which is what
a collective checkpoint needs.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers a stop signal until the training loop reaches a step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: checkpointing inside a signal handler could interrupt a collective.
        self.signal = signum

    def install(self) -> None:
        """Catch the stop signals (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank has been signalled; every rank must call this at the same step.
        Afterwards every rank knows the signal (the highest number, if ranks got different
        ones), so that rank 0 can report it."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signal is not None
        t = torch.tensor([float(self.signal or 0)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() > 0:
            self.signal = int(t.item())
        return self.signal is not None

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a stop signal"
