"""Keep freed host memory for reuse, so that XLA's CPU programs stop re-faulting their scratch.

XLA:CPU gives every call of a compiled program one scratch ("temp") buffer and frees it
when the call ends: 208 MB for AlexNet's forward at batch 32 with the Winograd layers.
glibc serves a block that large with a fresh `mmap` and hands it back with `munmap`, so
every call page-faults and zeroes its scratch anew. Measured on 2 cores at batch 32: ~51,000
page faults and ~110 ms of kernel time per forward (~255 ms of wall time; ~205 ms without
the faults), ~133,000 faults per training step (~820 ms; ~700 ms without). torch.compile's
programs keep their buffers and take ~2,400 faults per forward.

Three `mallopt` settings make glibc keep the memory for the next call instead:

- M_ARENA_MAX = 1: XLA's worker threads allocate from the main arena. A thread's own
  arena is made of 64 MiB heaps, and glibc maps anything larger afresh whatever the
  settings below say.
- M_MMAP_MAX = 0: the main arena grows its heap (`brk`) instead of mapping large blocks.
- M_TRIM_THRESHOLD = 2 GiB - 1: freed memory at the top of the heap is not handed back.

What that costs: the process keeps its peak host memory until it exits, as a caching
allocator does, and all threads share one arena (glibc's per-thread caches still serve
small blocks without its lock). A thread keeps the arena it first allocated from, so the
settings must come before JAX starts its backend: `import alexnet_jax` applies them first
thing, and warns if JAX's CPU backend was already running. Glibc on Linux only; other
C libraries are left as they are. Set ALEXNET_JAX_KEEP_HOST_MEMORY=0 to opt out.

Limits: mallopt takes an int, so scratch of 2 GiB or more at the top of the heap is still
handed back and faulted again (AlexNet's training step at batch 32 needs ~0.5 GB). Threads
that other libraries started before the import may hold arenas of their own, which XLA's
threads can then share; and with jemalloc or tcmalloc preloaded the settings do nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

ENV = "ALEXNET_JAX_KEEP_HOST_MEMORY"

# (name, parameter number from glibc's <malloc.h>, value)
SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_ARENA_MAX", -8, 1),
    ("M_MMAP_MAX", -4, 0),
    ("M_TRIM_THRESHOLD", -1, 2**31 - 1),  # mallopt takes an int
)


def keep_freed_memory() -> str:
    """Apply SETTINGS to glibc's malloc; returns "applied" or why not (for logs and benchmarks).

    Idempotent. Warns (RuntimeWarning) when applied after JAX's CPU backend had started,
    because XLA's threads then keep the arenas they already have.
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
    refused = [name for name, param, value in SETTINGS if libc.mallopt(param, value) != 1]
    if refused:
        return f"not applied: mallopt refused {', '.join(refused)}"
    if _jax_cpu_backend_started():
        warnings.warn(
            "alexnet_jax was imported after JAX started its CPU backend, so XLA's threads keep "
            "glibc's default arenas and CPU programs may re-fault their scratch memory on every call "
            "(AlexNet ~20% slower); import alexnet_jax before running JAX code",
            RuntimeWarning,
            stacklevel=2,
        )
        return "applied late: JAX's CPU backend had started"
    return "applied"


def _jax_cpu_backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # private, hence the guard: a newer JAX may move it

        if not xla_bridge.backends_are_initialized():
            return False
        import jax

        return jax.default_backend() == "cpu"
    except (ImportError, AttributeError):
        return False
