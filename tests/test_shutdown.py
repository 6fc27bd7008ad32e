"""Signals as stop requests: the first is recorded, a second gets through at once, handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from alexnet_jax.io import atomic_write_bytes
from alexnet_jax.shutdown import Interrupted, StopRequested, StopSignals, exit_status, interrupt_on_signals


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_a_request_and_a_second_stops_at_once(first):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(first)  # recorded, nothing raised
        assert stop.received == first
        # A second one (Ctrl-C here: a second SIGTERM would end pytest) goes to the previous handler.
        signal.raise_signal(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before
    with StopSignals() as stop:
        pass
    assert stop.received is None and {s: signal.getsignal(s) for s in before} == before


def test_the_stop_message_and_exit_status():
    stop = StopRequested(signal.SIGTERM, 7, "runs/a/checkpoints/7")
    assert str(stop) == "stopped by SIGTERM at step 7: checkpoint in runs/a/checkpoints/7; continue with --resume"
    assert stop.exit_status == exit_status(signal.SIGTERM) == 143
    assert StopRequested(signal.SIGINT, 0, None).exit_status == 130
    assert str(StopRequested(signal.SIGINT, 0, None)) == "stopped by SIGINT at step 0: nothing to save yet"


def test_sigterm_mid_write_in_a_short_cli_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The converter's way: SIGTERM becomes an exception, so the atomic write's cleanup runs."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupt_on_signals()
        monkeypatch.setattr(os, "fsync", lambda fd: signal.raise_signal(signal.SIGTERM))  # arrives mid-write
        with pytest.raises(Interrupted) as stopped:
            atomic_write_bytes(tmp_path / "out.msgpack", b"weights")
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert stopped.value.signum == signal.SIGTERM and exit_status(stopped.value.signum) == 143
    assert os.listdir(tmp_path) == []
