"""What several test modules need: running Python the way a user does, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
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
