"""Keep freed host memory for reuse, so that XLA's CPU programs stop re-faulting their scratch.

An explicit, process-wide choice: `import alexnet_jax` never makes it. The project's entry
points (the `alexnet-jax` command, examples/, convert/, benchmarks/) call `keep_freed_memory()` first thing; a
library user who wants it calls it at the top of their own script, or sets the same
three settings from outside the process:

    GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647

Why: XLA:CPU gives every call of a compiled program one scratch ("temp") buffer and frees
it when the call ends. glibc serves a block that large with a fresh `mmap` and hands it
back with `munmap`, so every call page-faults and zeroes its scratch anew (docs/performance.md;
benchmarks/RESULTS.md has the measurements). Three `mallopt` settings make glibc keep it:

- M_ARENA_MAX = 1: XLA's worker threads allocate from the main arena. A thread's own
  arena is made of 64 MiB heaps, and glibc maps anything larger afresh whatever the
  settings below say.
- M_MMAP_MAX = 0: the main arena grows its heap (`brk`) instead of mapping large blocks.
- M_TRIM_THRESHOLD = 2 GiB - 1: freed memory at the top of the heap is not handed back.

What that costs, and why it is not a library's default: the whole process keeps its peak
host memory until it exits (numpy arrays and everything else, not only XLA's), and all
threads share one arena. A thread keeps the arena it first allocated from, so the call
must come before JAX starts its backend; a later call warns. Glibc on Linux only; other C
libraries are left as they are, and so is a process that sets ALEXNET_JAX_KEEP_HOST_MEMORY=0
(the entry scripts' opt-out). mallopt takes an int, so scratch of 2 GiB or more is still
handed back; threads that other libraries started earlier may hold arenas of their own;
with jemalloc or tcmalloc preloaded the settings do nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

from alexnet_jax.upstream import jax_backends_initialized

ENV = "ALEXNET_JAX_KEEP_HOST_MEMORY"

# (mallopt name, parameter number from glibc's <malloc.h>, value, the same setting as a glibc tunable)
SETTINGS: tuple[tuple[str, int, int, str], ...] = (
    ("M_ARENA_MAX", -8, 1, "glibc.malloc.arena_max"),
    ("M_MMAP_MAX", -4, 0, "glibc.malloc.mmap_max"),
    ("M_TRIM_THRESHOLD", -1, 2**31 - 1, "glibc.malloc.trim_threshold"),  # mallopt takes an int
)
# The value of GLIBC_TUNABLES that makes the same settings from outside the process.
TUNABLES = ":".join(f"{tunable}={value}" for _, _, value, tunable in SETTINGS)


def keep_freed_memory() -> str:
    """Apply SETTINGS to glibc's malloc for the whole process; call it before JAX starts its backend.

    **Returns:** "applied", or why not (for logs and benchmarks). Idempotent. Warns
    (RuntimeWarning) when applied after JAX's CPU backend had started, because XLA's
    threads then keep the arenas they already have.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({ENV}={os.environ[ENV]})"
    if not sys.platform.startswith("linux"):
        return f"not applied: {sys.platform} is not Linux"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return "not applied: the C library is not glibc"
    refused = [name for name, param, value, _ in SETTINGS if libc.mallopt(param, value) != 1]
    if refused:
        return f"not applied: mallopt refused {', '.join(refused)}"
    if _jax_cpu_backend_started():
        warnings.warn(
            "keep_freed_memory() came after JAX started its CPU backend, so XLA's threads keep "
            "glibc's default arenas and CPU programs may re-fault their scratch memory on every call "
            "(slower steps); call it before running JAX code",
            RuntimeWarning,
            stacklevel=2,
        )
        return "applied late: JAX's CPU backend had started"
    return "applied"


def _jax_cpu_backend_started() -> bool:
    if "jax" not in sys.modules or not jax_backends_initialized():
        return False
    import jax

    return jax.default_backend() == "cpu"
