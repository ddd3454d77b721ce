"""The stop request: which signals it catches, and what a second Ctrl-C does (one process)."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from distrib.train.signals import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_is_remembered_until_the_step_boundary(sig: signal.Signals) -> None:
    stop = StopRequest()
    stop.install()
    try:
        assert not stop.agreed()
        os.kill(os.getpid(), sig)
        assert stop.agreed() and stop.name() == sig.name
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is not stop._handle


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # after another signal: still the first Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()


def test_a_signal_during_the_exchange_waits_for_the_next_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every rank decides from the exchanged value: a signal that arrives while this rank is
    inside the all-reduce (after contributing "none") must not make it stop alone."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stop = StopRequest()
        real = dist.all_reduce

        def signalled_meanwhile(tensor, *args, **kwargs):
            work = real(tensor, *args, **kwargs)
            stop.signal = int(signal.SIGUSR1)  # the handler ran after our contribution
            return work

        monkeypatch.setattr(dist, "all_reduce", signalled_meanwhile)
        assert not stop.agreed()  # the other ranks saw 0: nobody stops at this step
        monkeypatch.setattr(dist, "all_reduce", real)
        assert stop.agreed() and stop.name() == "SIGUSR1"
    finally:
        dist.destroy_process_group()
