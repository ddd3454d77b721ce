"""Stop cleanly on SIGTERM, SIGUSR1 or SIGINT: finish the current step, save a checkpoint, exit 0.

Slurm sends SIGTERM on preemption and, with `#SBATCH --signal=USR1@N`, SIGUSR1 N seconds before
the time limit. Ctrl-C (SIGINT) does the same; a second Ctrl-C stops at once (KeyboardInterrupt)
for a user who will not wait for the checkpoint. torchrun starts its workers in sessions of their
own and forwards the one SIGINT it gets, so each worker sees a single Ctrl-C as one. A signal may reach only some ranks (or reach them at different steps), so after
each step every rank shares whether it has one; all stop at the same step boundary, which is what
a collective checkpoint needs.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Remembers a stop signal until the training loop reaches a step boundary.

    Ranks agree over a gloo group of CPU tensors of their own: an exchange over the training
    group (NCCL on GPUs) would need a device tensor, and reading it back (`.item()`) would make
    the host wait for the device after every step, which nothing else in an unlogged step does.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._interrupted = False  # a Ctrl-C came: the next one interrupts at once
        self._previous: dict[int, object] = {}
        self._group: dist.ProcessGroup | None = None
        if dist.is_available() and dist.is_initialized():
            # Every rank builds the trainer, so every rank creates the group together.
            self._group = dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self._interrupted = self._interrupted or signum == signal.SIGINT
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

    def agreed(self) -> bool:
        """Whether any rank has been signalled; every rank must call this at the same step.
        Afterwards every rank knows the signal (the highest number, if ranks got different
        ones), so that rank 0 can report it."""
        if self._group is None:
            return self.signal is not None
        t = torch.tensor([self.signal or 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        # Decide from the reduced value alone: a signal that lands during the exchange is in
        # `self.signal` now but not in what the other ranks saw, and stopping on it here would
        # send this rank to the checkpoint while they train on (a hang). It counts next step.
        if int(t) == 0:
            return False
        self.signal = int(t)
        return True

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a stop signal"
