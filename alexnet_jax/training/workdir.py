"""Who owns a training workdir: one run at a time, and a finished run's results kept unless asked.

    with WorkdirLock("runs/a"):          # WorkdirBusyError naming the holder if another run has it
        if finished_results("runs/a", ("final.msgpack",)):
            ...                          # refuse, or remove_results(...) when told to overwrite

The lock is `fcntl.flock` on `runs/a/run.lock`, which holds the owner's host, pid and
start time for the message another run gets. The kernel drops the lock when its
process ends however it ends (SIGKILL included), so a crashed run never leaves a
stale lock; the file stays, naming the last owner. flock works across the hosts of
an NFS share on Linux (the client turns it into an NFS byte-range lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import jax

from alexnet_jax.distributed.parallel import over_processes
from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.training.config import EARLIER_DEFAULTS, TrainConfig, run_defining, same_trajectory
from alexnet_jax.training.metrics import CURVES_FILE, METRICS_FILE
from alexnet_jax.training.sources import fingerprint_change

LOCK_FILE = "run.lock"
FINAL_VARIABLES_FILE = "final.msgpack"
CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # the training data's fingerprint, checked on --resume
COLOUR_PCA_FILE = "colour_pca.json"
CHECKPOINT_DIR = "checkpoints"
# What a finished run leaves: never replaced without --resume or --overwrite. (config.json
# alone is not a result: a run killed before its first checkpoint leaves nothing else.)
RESULT_FILES = (FINAL_VARIABLES_FILE, METRICS_FILE, CURVES_FILE)


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir; the message names it (host, pid, start time)."""


class WorkdirLock:
    """An exclusive, non-blocking lock on `workdir` for the life of a run (a context manager)."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """**Raises:** WorkdirBusyError when another run holds the lock; OSError when the file cannot be made."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.workdir} is in use by another run ({holder}); wait for it to end, stop it, "
                "or use another --workdir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its name yet"


def finished_results(workdir: str | os.PathLike, names: tuple[str, ...]) -> list[str]:
    """Which of `names` (a run's result files) exist in `workdir`."""
    return [name for name in names if (Path(workdir) / name).exists()]


def remove_results(workdir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Delete the result files and folders `names` from `workdir` (for an explicit --overwrite)."""
    for name in names:
        path = Path(workdir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_workdir(
    workdir: Path, config: TrainConfig, resume: bool, latest: int | None, *, data: dict[str, Any] | None = None
) -> str | None:
    """Check, writing nothing, that `workdir` can hold this run: a new one, or the same run resumed.

    A resumed run must have the same run-defining settings and the same training data (its
    `fingerprint`, unless `config.allow_data_change`). Then `write_run_files`.
    **Returns:** what changed in the training data since the run began (allowed), or None.
    **Raises:** FileNotFoundError, FileExistsError, ValueError, each one line.
    """
    config_path = workdir / CONFIG_FILE
    if resume and latest is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to resume from (start without --resume)")
    if not resume and latest is not None:
        raise FileExistsError(
            f"{workdir}: already holds checkpoints up to step {latest}; pass --resume or use a new workdir "
            "(--overwrite deletes them)"
        )
    results = finished_results(workdir, RESULT_FILES)
    if not resume and results:
        raise FileExistsError(
            f"{workdir}: holds the results of a finished run ({', '.join(results)}) and no checkpoint to resume "
            "from; use a new workdir, or pass --overwrite to replace them"
        )
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        # A field missing from an older config.json had its default then, or the earlier behaviour.
        defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **EARLIER_DEFAULTS}
        changed = [
            f"{k} ({saved.get(k, defaults[k])!r} -> {getattr(config, k)!r})"
            for k in run_defining(config)
            if not same_trajectory(k, saved.get(k, defaults[k]), getattr(config, k))
        ]
        if changed:
            raise ValueError(f"{workdir}: cannot resume exactly with a different {', '.join(changed)}")
    data_path, change = workdir / DATA_FILE, None
    if resume and data is not None and data_path.is_file():
        change = fingerprint_change(json.loads(data_path.read_text()), data)
        if change is not None and not config.allow_data_change:
            raise ValueError(
                f"{config.data}: the training data changed since this run began ({change}), so a resumed run would "
                "not read the batches it would have read; restore the data, or pass --allow-data-change to go on "
                "with the new data from the step resumed"
            )
    return change


def check_epochs_left(workdir: Path, config: TrainConfig, done_epochs: int) -> None:
    """**Raises:** ValueError, one line, when a resumed run's checkpoint has done `config.epochs` already."""
    if config.epochs <= done_epochs:
        raise ValueError(
            f"{workdir}: {done_epochs} epoch(s) are done already, so --epochs {config.epochs} leaves nothing to "
            f"train; pass --epochs {done_epochs + 1} or more to go on"
        )


def write_run_files(workdir: Path, config: TrainConfig, data: dict[str, Any] | None, *, replace_data: bool) -> None:
    """config.json, and the training data's fingerprint (data.json) when there is none or `replace_data`."""
    if jax.process_index() == 0:
        atomic_write_bytes(workdir / CONFIG_FILE, (json.dumps(dataclasses.asdict(config), indent=2) + "\n").encode())
        data_path = workdir / DATA_FILE
        if data is not None and (replace_data or not data_path.is_file()):
            atomic_write_bytes(data_path, (json.dumps(data, indent=2) + "\n").encode())


@contextlib.contextmanager
def own_workdir(workdir: Path, overwrite: bool):
    """Process 0 locks `workdir` for the run (and clears it for `overwrite`); every process learns the outcome."""
    lock, busy = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusyError as e:
            busy = e
    if over_processes(busy is not None).any():
        raise busy or WorkdirBusyError(f"{workdir} is in use by another run (process 0 says by whom)")
    try:
        if overwrite:
            if jax.process_index() == 0:
                remove_results(workdir, (CHECKPOINT_DIR, CONFIG_FILE, DATA_FILE, *RESULT_FILES))
            over_processes(0)  # the others wait until it is cleared
        yield
    finally:
        lock.release()
