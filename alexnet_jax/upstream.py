"""Every private name of JAX, jaxlib and Grain this package relies on, in one place.

Public APIs are used everywhere else. Each private name is looked up here, inside a
function, never at import; `PRIVATE_NAMES` lists them with what they are for, and
tests/test_upstream.py resolves every one, so an upgrade that moves one fails that test
by name instead of breaking a run far from here. Where a name is gone, each function says
what it falls back to.

This module imports nothing at module level beyond the standard library:
`distributed/coordinator_service.py` loads it by path, without the package (and JAX).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

# "module:attribute.path" -> what this package uses it for.
PRIVATE_NAMES: dict[str, str] = {
    "jax._src.xla_bridge:backends_are_initialized": (
        "host_memory.keep_freed_memory: whether JAX's CPU backend has started (the setting is then late)"
    ),
    "jax._src.clusters:ClusterEnv.auto_detect_unset_distributed_params": (
        "distributed.parallel: process 0 must know it is process 0 (Slurm, Open MPI, k8s, TPU) before JAX starts"
    ),
    "jax._src.distributed:global_state": (
        "distributed.parallel: the runtime client whose key-value store carries the heartbeats"
    ),
    "jaxlib._jax:get_distributed_runtime_service": (
        "distributed.coordinator_service: process 0's coordination service, in a child process of its own"
    ),
    "grain.multiprocessing:SharedMemoryArray._del_thread_pool": (
        "training.pipeline: wait for Grain's unlinks of /dev/shm before a stopped run exits"
    ),
    "grain.multiprocessing:SharedMemoryArray._unlink_on_del": (
        "training.pipeline: a batch's /dev/shm name is unlinked as it is handed over (an instance attribute)"
    ),
    "atexit:_run_exitfuncs": (
        "cli.train: a run stopped at once runs the exit handlers (multiprocessing's release its semaphores) "
        "without waiting for Orbax's thread to finish an abandoned save"
    ),
}


class UpstreamChanged(RuntimeError):
    """A private upstream name this package relies on is gone; the message names it and what it was for."""


def lookup(name: str) -> Any:
    """The object `PRIVATE_NAMES`' key `name` ("module:attr.attr") names.

    **Raises:** UpstreamChanged when the module or an attribute is missing.
    """
    module_name, _, attributes = name.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for attribute in attributes.split("."):
            value = getattr(value, attribute)
    except (ImportError, AttributeError) as e:
        raise UpstreamChanged(f"{name} is gone ({e}); it was for {PRIVATE_NAMES.get(name, 'this package')}") from e
    return value


def jax_backends_initialized() -> bool | None:
    """Whether JAX has started any backend; None when JAX no longer says (callers then assume not)."""
    try:
        return bool(lookup("jax._src.xla_bridge:backends_are_initialized")())
    except UpstreamChanged:
        return None


def detect_cluster(
    coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int
) -> tuple[str | None, int | None, int | None]:
    """JAX's own cluster detection (Slurm, Open MPI, Kubernetes, Cloud TPU) for the values not given.

    **Raises:** UpstreamChanged when JAX moved it, or whatever the detection raises.
    """
    detect = lookup("jax._src.clusters:ClusterEnv.auto_detect_unset_distributed_params")
    found = detect(coordinator, num_processes, process_id, None, None, timeout_s)
    return found[0], found[1], found[2]


def distributed_state() -> tuple[Any, int, int]:
    """(JAX's distributed runtime client, this process's id, the number of processes), as Orbax reaches them.

    **Raises:** UpstreamChanged when JAX moved it; RuntimeError before `jax.distributed.initialize`.
    """
    state = lookup("jax._src.distributed:global_state")
    if state.client is None:
        raise RuntimeError("jax.distributed is not initialized: no runtime client to send heartbeats through")
    return state.client, state.process_id, state.num_processes


def distributed_runtime_service(
    bind_address: str, num_processes: int, *, heartbeat_timeout: int, shutdown_timeout: int, recoverable: bool
) -> Any:
    """jaxlib's coordination service, the one `jax.distributed.initialize` starts in process 0."""
    start = lookup("jaxlib._jax:get_distributed_runtime_service")
    return start(
        bind_address,
        num_processes,
        heartbeat_timeout=heartbeat_timeout,
        shutdown_timeout=shutdown_timeout,
        recoverable=recoverable,
    )


def unlink_shared_memory_now(array: Any) -> bool:
    """Unlink a Grain worker array's /dev/shm name now, instead of when Grain collects it; False if not such an array.

    The mapping stays valid until the array is collected. Grain marks the arrays it will
    unlink with the private `_unlink_on_del`; without that flag nothing is done.
    """
    shared = lookup("grain.multiprocessing:SharedMemoryArray")
    if not (isinstance(array, shared) and getattr(array, "_unlink_on_del", False)):
        return False
    array.shm.unlink()
    array._unlink_on_del = False  # Grain's own unlink would fail on the missing name
    return True


def wait_for_grain_unlinks() -> None:
    """Return once Grain's pool of one thread has unlinked the shared memory of every batch collected so far."""
    try:
        pool = lookup("grain.multiprocessing:SharedMemoryArray._del_thread_pool")
    except UpstreamChanged:
        return
    if pool is not None:
        pool.apply(int)  # a task queued behind the unlinks


def exit_without_waiting(status: int) -> NoReturn:
    """End the process now with `status`: the exit handlers run, no thread is waited for.

    multiprocessing's handlers release the semaphores and shared memory its queues hold, so
    Python's resource tracker finds nothing to warn about; a plain `os._exit` would skip them.
    Where the private runner is gone, the process ends without them.
    """
    try:
        lookup("atexit:_run_exitfuncs")()
    except UpstreamChanged:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
