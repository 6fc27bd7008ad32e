"""Signals as stop requests: the first is recorded, a second gets through at once, handlers come back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.training.shutdown import Interrupted, StopRequested, StopSignals, exit_status, interrupt_on_signals

from helpers import REPO, TRAIN_TINY, children, gone, shared_memory
from tiny_arch import tiny_config, train_flags


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


@pytest.fixture(scope="module")
def data(colour_data, tiny):
    return colour_data(8, 3)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ctrl_c_reaches_every_process_of_the_run_and_still_ends_in_one_line(data, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group (Slurm signals every process of a step alike),
    so the data worker gets it too. Before: the worker died mid-batch with a 15-line KeyboardInterrupt
    traceback and the resource tracker warned of its batches' leaked shared memory."""
    workdir = tmp_path / "run"
    args = train_flags(tiny_config(data, epochs=50, save_every=1, workers=1), workdir)
    run = subprocess.Popen(
        [sys.executable, TRAIN_TINY, *args],  # the training CLI on the tests' tiny network
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    try:
        deadline = time.monotonic() + 120
        while not list((workdir / "checkpoints").glob("[0-9]*")):  # trained a step: the worker is busy
            if run.poll() is not None or time.monotonic() > deadline:
                if run.poll() is None:
                    os.killpg(run.pid, signal.SIGKILL)
                pytest.fail(f"the run never saved a step: {run.communicate()[1][-2000:]}")
            time.sleep(0.1)
        workers = children(run.pid)  # Grain's worker and Python's resource tracker
        held = shared_memory([run.pid, *workers])
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT at step "), err
    assert len(workers) == 2 and gone(workers, within_s=10), workers
    assert held and not [name for name in held if os.path.exists(f"/dev/shm/{name}")], held


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_second_signal_stops_at_once_in_one_line_naming_the_checkpoint_to_resume_from(data, tmp_path):
    workdir = tmp_path / "run"
    args = train_flags(tiny_config(data, epochs=50, save_every=1, workers=1), workdir)
    run = subprocess.Popen(
        [sys.executable, TRAIN_TINY, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((workdir / "checkpoints").glob("[0-9]*"))) < 2:  # training and saving
            if run.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run never saved two steps: {run.communicate()[1][-2000:]}")
            time.sleep(0.05)
        workers = children(run.pid)
        held = shared_memory([run.pid, *workers])
        # A stop request and, right behind it, "now", both reaching the run within its step, before the stop
        # could end it. Two signals of one kind sent so close would merge into one (the kernel keeps one
        # pending signal of a kind), so the second is the other kind: SIGTERM from a scheduler, Ctrl-C.
        run.send_signal(signal.SIGTERM)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    lines = err.splitlines()
    # Python runs the handlers of signals pending together in their numeric order (SIGINT first).
    second = re.match(r"stopped at once by a second (SIGTERM|SIGINT): ", lines[0]) if lines else None
    assert len(lines) == 1 and second, err
    assert run.returncode == 128 + getattr(signal, second.group(1)), err
    step = int(re.search(r"--resume will continue from step (\d+) \(", lines[0]).group(1))
    assert f"({workdir / 'checkpoints' / str(step)})" in lines[0] and (workdir / "checkpoints" / str(step)).is_dir()
    assert gone(workers, within_s=10), workers
    assert held and not [name for name in held if os.path.exists(f"/dev/shm/{name}")], held
