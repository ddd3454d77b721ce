"""The stop request: which signals it catches, and what a second Ctrl-C does (one process)."""

from __future__ import annotations

import os
import signal

import pytest

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
