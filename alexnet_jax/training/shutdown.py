"""How a run ends when something outside stops it: signals, and worker processes whose parent died.

    with StopSignals() as stop:          # SIGTERM / SIGINT now set stop.received
        for batch in batches:
            ...
            if stop.received:             # at a step boundary: save, then
                raise StopRequested(stop.received, step, "runs/a/checkpoints")

Slurm, Kubernetes and preemptible TPU VMs send SIGTERM and wait a grace period
before SIGKILL; Ctrl-C sends SIGINT. Both become a request that the training loop
honours at the next step boundary (save, then stop), so nothing is lost and no
traceback is printed. A second signal of either kind raises `Interrupted` at once
(the training loop turns it into `StoppedAtOnce`, which says whether a save was
abandoned and where `--resume` will continue) and restores the previous handlers: a
user who presses Ctrl-C twice gets out at once. The exit status after a stop is 128
+ the signal number (143 for SIGTERM, 130 for SIGINT), what shells and schedulers
report for a process ended by that signal.

SIGKILL cannot be caught. What it must not leave behind are the data-loading
worker processes and the shared memory they hold: `worker_init` runs in each
worker and ends it when its parent is gone, after which Python's resource
tracker unlinks the leftover shared memory and semaphores. It also makes the
workers deaf to SIGINT and SIGTERM, which a terminal's Ctrl-C and a scheduler send
to every process of the job, workers included: the parent decides when they stop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How often a worker looks whether its parent still lives: the delay before an orphaned
# worker ends, against a wake-up that costs nothing measurable.
PARENT_POLL_S = 0.5


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal `signum`: 128 + signum (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + signum


class StopRequested(Exception):
    """The run stopped at a step boundary because of a signal, after saving; `exit_status` is 128 + the signal."""

    def __init__(self, signum: int, step: int, saved: str | None) -> None:
        self.signum, self.step, self.saved = signum, step, saved
        name = signal.Signals(signum).name
        where = f"checkpoint in {saved}; continue with --resume" if saved else "nothing to save yet"
        super().__init__(f"stopped by {name} at step {step}: {where}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class StopSignals:
    """While entered, SIGTERM and SIGINT set `received` (the first signal's number) instead of ending the process.

    Handlers can only be set from the main thread; entered from another thread this
    changes nothing and `received` stays None. The previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            return
        # Asked twice: the user means now. `Interrupted` unwinds the run from wherever it is
        # (a save it was waiting for included), so the data workers are still closed and the
        # caller can say what was left; a third signal meets the previous handlers.
        self._restore()
        raise Interrupted(signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


class Interrupted(KeyboardInterrupt):
    """Raised by `interrupt_on_signals`' handler: SIGINT or SIGTERM, as the exception Ctrl-C raises."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StoppedAtOnce(Interrupted):
    """A second signal ended the run at once: where it was, and which checkpoint `--resume` will continue from."""

    def __init__(self, signum: int, abandoned: int | None, resume_from: int | None, directory: str) -> None:
        super().__init__(signum)
        self.abandoned, self.resume_from, self.directory = abandoned, resume_from, directory
        name = signal.Signals(signum).name
        what = f"the save of step {abandoned} was abandoned" if abandoned is not None else "no save was in progress"
        where = (
            f"--resume will continue from step {resume_from} ({directory}/{resume_from})"
            if resume_from is not None
            else "no checkpoint is complete yet: start again without --resume"
        )
        self.message = f"stopped at once by a second {name}: {what}; {where}"

    def __str__(self) -> str:
        return self.message

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


def interrupt_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Make SIGTERM (and SIGINT) raise `Interrupted` in the main thread, for short CLIs without a loop to stop.

    Process-wide: for entry scripts only. An exception, unlike the default end of
    the process, runs `finally` and `except` blocks: an atomic write removes its
    temporary file, the script prints one line and exits with `exit_status(e.signum)`.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    for signum in signals:
        signal.signal(signum, handle)


def exit_with_parent(parent_pid: int, *_worker_info: int) -> None:
    """Start a thread that ends this process soon after `parent_pid` is no longer its parent.

    For Grain's `worker_init_fn` (which passes the worker's index and count, ignored):
    `functools.partial(exit_with_parent, os.getpid())`, made in the parent. A worker
    whose parent was killed is reparented (to init or a subreaper), so its parent pid
    changes; polling that is portable and, unlike Linux's PR_SET_PDEATHSIG, does not
    fire when the *thread* that started the worker ends (Grain starts them from helper
    threads). The worker ends with os._exit: nothing in it is worth finishing.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_init(parent_pid: int, *_worker_info: int) -> None:
    """Grain's `worker_init_fn` for data-loading workers: `functools.partial(worker_init, os.getpid())`.

    Ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process group and Slurm signals
    every process of a step, and a worker ended by either died mid-batch (a 15-line
    KeyboardInterrupt traceback, and its unsent batches' shared memory left to the resource
    tracker, which warns). The parent stops them instead, at the stop it honours: closing
    the pipeline ends them cleanly (Grain sets their stop event, then SIGKILLs a worker
    that did not end in time). Then `exit_with_parent`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(parent_pid)
