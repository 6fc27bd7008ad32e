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

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


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
