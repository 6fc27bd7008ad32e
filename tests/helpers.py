"""What several test modules need: running Python the way a user does, in a fresh process; its child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(
    args: Iterable[str | os.PathLike],
    *,
    env: Mapping[str, str] | None = None,
    drop_env: Iterable[str] = (),
    cwd: str | os.PathLike = REPO,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`python ARGS...` in a fresh process, output captured as text.

    The child inherits this environment (the session's compilation cache among it), less
    the names in `drop_env`, plus `env`. A child that outlives `timeout` fails the test.
    """
    dropped = set(drop_env)
    base = {k: v for k, v in os.environ.items() if k not in dropped}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_from_script_on_devices(script: str | os.PathLike, devices: int) -> dict:
    """Run a test module as a script on `devices` forced CPU devices; the JSON of its last stdout line.

    The rest of the suite runs on one device, and XLA's device count is fixed when JAX
    starts, so multi-device checks compute in a child and the tests read what it printed.
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    run = run_python([script], env={"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pids: list[int], within_s: float) -> bool:
    """Whether every pid has ended (or is a zombie) within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.2)
