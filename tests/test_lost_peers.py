"""A process of a multi-process run that dies, freezes or fails alone: every other one ends with one line, exit 1.

Two processes of the training CLI with `--parallel sharded` on 127.0.0.1 (as in test_multihost,
on the tests' tiny network), one of them killed, stopped or given a bad path once the run has
assembled. The children are bounded by timeouts and killed in `finally`; `--peer-timeout 5`
keeps the waits short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import children, end, free_port, gone, launch_train
from tiny_arch import tiny_config, train_flags

# Each test runs two training processes and waits out a peer's loss.
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(colour_data, tiny):
    return colour_data(6, 2)  # 18 images: 2 steps of 8


def _args(data, workdir: Path) -> list[str]:
    return train_flags(tiny_config(data, lr=0.01), workdir)  # the run of test_multihost


def _start_two(args: list[str], workdir: Path, extra: list[str] = ()) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a run, returned once it has assembled (process 0 wrote config.json)."""
    port = free_port()
    procs = [launch_train([*args, *extra], port, i) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while not (workdir / "config.json").is_file():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            end(procs)
            pytest.fail(f"the run never assembled: {[p.stderr.read()[-2000:] for p in procs]}")
        time.sleep(0.1)
    return procs


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err and "Check failure" not in err and "Terminating process" not in err, err
    return errors[0]


def test_a_dead_coordinator_ends_the_other_process_with_one_line_and_exit_1(data, tmp_path):
    """Process 0, which holds the coordinator, is SIGKILLed once the run has assembled. Before: process 1 was
    aborted by jaxlib at once (SIGABRT, a C++ stack). Its coordination service runs in a child of its own,
    which serves on until the others had time to notice."""
    workdir = tmp_path / "w"
    procs = _start_two(_args(data, workdir), workdir, ["--peer-timeout", "5"])
    try:
        service = children(procs[0].pid)  # the coordination service (and nothing else: --workers 0)
        assert len(service) == 1, service
        procs[0].kill()
        killed = time.monotonic()
        _, err = procs[1].communicate(timeout=120)
    finally:
        end(procs)
    assert procs[1].returncode == 1, err
    assert time.monotonic() - killed < 60  # a collective notices at once; the watch within 5 s
    assert "process 1: lost contact with" in _one_error_line(err)
    # Still serving after process 1 ended (its linger is 5 + 10 s), and it then ends on its own
    # (test_peers waits that out with a short linger); not waited for here.
    assert not gone(service, within_s=0), "the coordination service did not outlive process 0"
    os.kill(service[0], signal.SIGKILL)


def test_a_hung_peer_ends_the_other_process_within_the_peer_timeout(data, tmp_path):
    """Process 1 is stopped (SIGSTOP: alive, connected, silent), so process 0 waits in a collective that
    never fails. Its heartbeat watch ends it with one line after --peer-timeout; before, jaxlib aborted it
    when the coordinator's own heartbeat timeout passed."""
    workdir = tmp_path / "w"
    procs = _start_two(_args(data, workdir), workdir, ["--peer-timeout", "5"])
    try:
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
    finally:
        end(procs)
    assert procs[0].returncode == 1, err
    # It waited for the timeout: process 1's last heartbeat came up to a beat or two before the stop.
    assert 3 <= time.monotonic() - stopped < 60
    assert _one_error_line(err).startswith(
        "error: process 0: lost contact with process 1 of the run: no heartbeat for 5 s"
    )


def test_a_process_that_fails_alone_ends_the_other_with_one_line(data, tmp_path):
    """Process 1 cannot read its data (a path missing on its host); process 0 goes on to its first collective.
    Before: process 1 returned 1 and waited at JAX's shutdown barrier while process 0 waited for it in the
    collective, and the run hung. Now process 1 leaves at once, and process 0's collective fails."""
    port, procs = free_port(), []
    try:
        for i in range(2):
            args = _args(data, tmp_path / "w")
            if i == 1:
                args[args.index("--data") + 1] = str(tmp_path / "missing")
            procs.append(launch_train([*args, "--peer-timeout", "10"], port, i))
        errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
        end(procs)
    assert [p.returncode for p in procs] == [1, 1], errs
    assert str(tmp_path / "missing") in _one_error_line(errs[1])
    assert "process 0: lost contact with" in _one_error_line(errs[0])
