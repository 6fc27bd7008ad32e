"""Files this package writes: atomic writes, output checks, and disk-full errors a person can act on.

Writes are atomic: the bytes go to a temporary file in the same folder, are
fsynced, then renamed over the target, so an interrupted or failed run never
leaves a truncated or half-written file under the requested name. (The folder is
not fsynced: after a power loss the rename itself may be lost, leaving the old file.)
A write that fails removes its temporary file; one that was killed (SIGKILL, power
loss) cannot, so the temporary name carries the writer's host and pid, and the next
write to the same target removes those whose writer is gone.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import secrets
import shutil
import socket
from pathlib import Path

# Errors that mean "the disk (or this process's share of it) is full".
# A write refused for want of room: a full disk or quota, or the process's file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _host() -> str:
    # In a file name: letters, digits and dashes only.
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    # Not tempfile.mkstemp: it makes the file 0600, and reading the umask to undo that means
    # setting it, process-wide. Created with mode 0666, the file gets what the umask allows,
    # as a plain open() would. Host and pid in the name let a later write tell a dead
    # writer's leftover from a live writer's file (_remove_stale_temporaries).
    while True:
        tmp = folder / f".{name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete `.<name>.<host>.<pid>.<hex>.tmp` files left by killed writers on this host.

    Only this host's, and only those whose pid no longer runs: a file another
    process is writing right now is never touched. (A killed writer on another host
    sharing the folder leaves its file until a write from that host.)
    """
    pattern = re.compile(re.escape(f".{name}.{_host()}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            Path(entry.path).unlink(missing_ok=True)


def os_error(code: int | None, message: str) -> OSError:
    """An OSError carrying `code` as its errno whose text is `message` alone (no "[Errno n]" prefix)."""
    error = OSError(message)
    error.errno = code
    return error


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free on the disk holding `path` (its nearest existing ancestor), or None when unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def no_space_message(
    path: str | os.PathLike, needed: int, reason: str = "No space left on device", code: int = errno.ENOSPC
) -> str:
    """One line for a write refused for want of room (`code` one of NO_SPACE_ERRNOS): the path, what it needs,
    and what to do. EFBIG is the process's file-size limit (`ulimit -f`), not a full disk: it says so."""
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit / 1e6:,.1f} MB"
        return (
            f"{path}: {reason}; a file may not grow past this process's file-size limit ({shown}, `ulimit -f`), "
            f"and writing it needs about {needed / 1e6:,.1f} MB. Raise the limit (`ulimit -f unlimited`) and try again"
        )
    free = free_bytes(path)
    there = f", {free / 1e6:,.1f} MB free there" if free is not None else ""
    return f"{path}: {reason}; writing it needs about {needed / 1e6:,.1f} MB{there}. Free some space and try again"


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Make sure files can be created in `folder` (created if missing) before any long work starts.

    Tried by creating and removing a file, not by permission bits: a read-only
    mount, a full disk or a root-squashed NFS share all fail the same way.
    **Raises:** OSError with one line naming the folder and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(folder, "write-test")
        os.close(fd)
        tmp.unlink()
    except OSError as e:
        raise os_error(e.errno, f"{what} {folder} is not writable ({e.strerror or e})") from None
    return folder


def check_output_file(path: str | os.PathLike) -> Path:
    """Check before a run that a results file can be written at `path`: its folder exists, `path`
    is not a folder, and a file can be created there (`check_writable_folder`).

    **Raises:** ValueError with one line naming `path` and the reason.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a file")
    try:  # a real file, not permission bits: read-only mounts and root-squashed shares too
        check_writable_folder(path.parent, "folder")
    except OSError as e:
        raise ValueError(f"{path}: {e}") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either untouched or complete.

    **Raises:** OSError; on a full disk its message names `path` and the space needed.
    """
    path = Path(path)
    _remove_stale_temporaries(path.parent, path.name)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in NO_SPACE_ERRNOS:
            raise os_error(e.errno, no_space_message(path, len(data), e.strerror, e.errno)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
