"""Data parallelism over devices and processes: `pmap`, `jit` with shardings, `jax.distributed`.

    parallel = make_parallel("sharded", global_batch=256, micro_steps=1)
    state = parallel.put_state(state)                       # replicated on every device
    state, metrics = parallel.step(state, parallel.put_batch(local_batch))

Both paths run `alexnet_jax.steps.apply_step`, so the math is written once:

- "pmap": state replicated (`in_axes=None`, `out_axes=None`: the outputs are already
  identical on every device, so nothing is indexed to unreplicate them), the batch
  reshaped to (devices, per device, ...) and placed sharded before the call, gradients
  and metrics summed with `lax.psum` over the axis "batch", a dropout key per device.
  Since JAX 0.8 `pmap` is built on `jit` + `shard_map`; it stays for users who ask for it.
- "sharded": `jit` with a `Mesh` over every device of every process, parameters
  replicated and the batch split along the axis "data"; the compiler inserts the
  all-reduce. What JAX recommends now, and the one that spans processes: each process
  passes only its own part of the global batch (`make_array_from_process_local_data`).

Multi-process runs start with `initialize_distributed` before anything else touches JAX.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.distributed.peers import LINGER_MARGIN_S, CoordinatorService, PeerWatch
from alexnet_jax.errors import first_line
from alexnet_jax.steps import TrainState, apply_step, device_batch, train_step
from alexnet_jax.upstream import detect_cluster, distributed_state

# "towers" is `distributed.towers`' layout of the 2012 network, built from its model (`make_towers`).
MODES = ("none", "pmap", "sharded", "towers")
PMAP_AXIS = "batch"  # the axis name flax's examples use for pmap
DATA_AXIS = "data"
# JAX's default is 300 s; a run that cannot reach its coordinator should say so sooner.
INIT_TIMEOUT_S = 120
# jaxlib aborts (SIGABRT) when its own initialization timeout passes; ours fires this much
# earlier, so the process ends with one line and status 1 instead.
_ABORT_MARGIN_S = 5
# Seconds a peer may be silent before the others end the run (one line, exit 1; distributed.peers).
PEER_TIMEOUT_S = 30
# jaxlib's own heartbeat timeout is only a backstop (it ends processes by SIGABRT): longer than ours.
_JAXLIB_HEARTBEAT_MARGIN_S = 30
EXIT_PEER_LOST = 1


class DistributedError(RuntimeError):
    """The processes of a run could not find each other; one line naming the coordinator."""


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = INIT_TIMEOUT_S,
    peer_timeout_s: int = PEER_TIMEOUT_S,
) -> None:
    """Join a multi-process run (`jax.distributed.initialize`); call before any other JAX call.

    With all three of `coordinator` ("HOST:PORT" of process 0), `num_processes` and
    `process_id` given, they are used as they are; left out, JAX detects them on
    Slurm, Open MPI, Kubernetes (JobSet) and Cloud TPU. The arguments are checked
    before any connection is tried.

    jaxlib aborts the whole process (SIGABRT, no Python exception) when it cannot
    reach the coordinator, so with an explicit address the other processes first
    wait for its port themselves and fail with a clear error; process 0 checks that
    the port is free. A peer that never arrives ends every waiting process after
    `timeout_s` with one line and status 1.

    Once joined, a peer that dies or freezes ends this process with one line and status 1
    within `peer_timeout_s` (or at once, when a collective notices first), including
    process 0: it serves the coordination service from a child process that outlives it
    long enough (`distributed.peers` says why). Process-wide on purpose: this starts a thread,
    and in process 0 that child, and registers an exit hook that ends both after JAX's
    shutdown barrier.
    **Raises:** ValueError for a malformed address or a process id out of range;
    DistributedError when the coordinator cannot be reached or bound within `timeout_s`.
    """
    if timeout_s < 1:
        raise ValueError(f"initialization timeout must be at least 1 s, got {timeout_s}")
    if peer_timeout_s < 2:
        raise ValueError(f"peer timeout must be at least 2 s, got {peer_timeout_s}")
    coordinator, num_processes, process_id = _detect(coordinator, num_processes, process_id, timeout_s)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"number of processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process id {process_id} is out of range for {num_processes} processes (0 to {num_processes - 1})"
        )
    if process_id is not None and process_id < 0:
        raise ValueError(f"process id must be at least 0, got {process_id}")
    service = None
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator address {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
        if process_id == 0:
            _check_port_free(int(port), coordinator, peer_timeout_s)
        elif process_id is not None:
            _wait_for_port(host.strip("[]"), int(port), timeout_s, coordinator)
    print(
        f"process {process_id if process_id is not None else '?'}: joining {num_processes or '?'} processes "
        f"through {coordinator or 'the auto-detected coordinator'} (timeout {timeout_s} s)",
        file=sys.stderr,
        flush=True,
    )
    where = coordinator or "the auto-detected coordinator"
    heartbeat_timeout_s = peer_timeout_s + _JAXLIB_HEARTBEAT_MARGIN_S
    extra = {}
    if process_id == 0 and coordinator is not None and (num_processes or 0) > 1:
        bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{coordinator.rpartition(':')[2]}")
        try:
            service = CoordinatorService(
                bind,
                num_processes,
                heartbeat_timeout_s=heartbeat_timeout_s,
                linger_s=peer_timeout_s + LINGER_MARGIN_S,
                timeout_s=timeout_s,
                recoverable=bool(jax.config.jax_enable_recoverability),  # what JAX would give its own
            )
        except RuntimeError as e:
            raise DistributedError(f"process 0 cannot serve as coordinator {coordinator}: {e}") from e
        # JAX starts a service in process 0 whatever it is told; this one, on a port of its
        # own on the loopback, is never contacted (the clients go to `coordinator`).
        extra["coordinator_bind_address"] = "127.0.0.1:0"
    # jaxlib aborts the process when a peer never arrives: end it first, in one line.
    watchdog = threading.Timer(
        timeout_s,
        _exit_now,
        (
            f"error: process {process_id if process_id is not None else '?'}: not all "
            f"{num_processes or '?'} processes joined through {where} within {timeout_s} s; "
            "start every process (same --coordinator and --num-processes) or raise --init-timeout",
        ),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout_s + _ABORT_MARGIN_S,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            **extra,
        )
    except Exception as e:  # jaxlib raises its own runtime error types; all mean "did not meet"
        if service is not None:
            service.close()
        reason = first_line(e)
        raise DistributedError(
            f"could not join the run through {where} within {timeout_s} s "
            f"(is process 0 running and the port reachable?): {reason}"
        ) from e
    finally:
        watchdog.cancel()
    # Not jax.process_count(): that would start the backend here, and a caller may still
    # set jax.config (e.g. jax_num_cpu_devices) after initialize, as JAX allows.
    watch = None
    try:
        client, index, count = distributed_state()
        if count > 1:
            watch = PeerWatch(
                client, index, count, timeout_s=peer_timeout_s, on_lost=_exit_now, active=jax.distributed.is_initialized
            ).start()
    finally:
        # Registered after JAX's own exit hook, so it runs before it: the watch keeps beating
        # through JAX's shutdown barrier (a peer still finishing must not take this process
        # for dead, nor this one it), and the service ends only after every process passed it.
        atexit.register(_leave_cleanly, watch, service)


def _detect(
    coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int
) -> tuple[str | None, int | None, int | None]:
    # Process 0 must know it is process 0, and the port, before JAX starts: it serves the
    # coordinator from a child process. JAX's own cluster detection (Slurm, Open MPI,
    # Kubernetes, Cloud TPU) answers; where it finds nothing, JAX's initialize says so.
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if None not in (coordinator, num_processes, process_id):
        return coordinator, num_processes, process_id
    try:
        return detect_cluster(coordinator, num_processes, process_id, timeout_s)
    except Exception as e:  # JAX's initialize detects again and reports what it cannot find
        print(
            f"warning: cluster detection failed ({first_line(e)}); process 0, if this is it, serves the "
            "coordinator in-process, and its death aborts the others",
            file=sys.stderr,
        )
        return coordinator, num_processes, process_id


def _leave_cleanly(watch: PeerWatch | None, service: CoordinatorService | None) -> None:
    try:
        jax.distributed.shutdown()  # JAX's barrier: every process has arrived when it returns
    finally:  # also when the barrier timed out: no late "lost contact" line, no service holding the port
        if watch is not None:
            watch.stop()
        if service is not None:
            service.close()


def _exit_now(message: str, status: int = EXIT_PEER_LOST) -> None:
    # Never asks JAX anything (jax.process_count() here, while the distributed client is still
    # connecting, makes jaxlib terminate with std::bad_cast).
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def leave_run(status: int) -> int:
    """End this process of a multi-process run now with `status`; in a single process, return `status`.

    For an entry script's exits after a failure that may be this process's alone (an
    unreadable file on this host, a failed save, a collective that lost a peer): at a
    normal exit JAX's atexit hook waits at a shutdown barrier for every peer, while the
    peers wait for this process in their next collective, and the run hangs. Leaving
    now closes this process's connections, so that collective fails in every peer and
    each ends with one line. Safe for process 0 too: the coordinator lives on in its own
    process for the others (`distributed.peers`). Not for a stop request, which every process
    meets at the same step and leaves through the normal exit.
    """
    if jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def exit_if_peer_lost(error: BaseException) -> None:
    """In a multi-process run, end this process with one line and status 1 for an error from JAX's runtime.

    A peer that died or froze makes the next collective (or the coordinator's
    heartbeat check) fail in every other process, with an error from XLA. Called by
    the entry script with an exception it did not expect; returns (so the caller
    re-raises) in a single-process run or for an error that is not JAX's.
    """
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    _exit_now(
        f"error: process {jax.process_index()}: lost contact with the other processes of the run "
        f"(one failed, died or froze): {first_line(error)}"
    )


def _check_port_free(port: int, coordinator: str, peer_timeout_s: int) -> None:
    # The service binds on every interface at this port (jaxlib crashes, SIGSEGV, on a taken one).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedError(
                f"process 0 cannot serve as coordinator {coordinator}: port {port} is taken ({e.strerror}); "
                f"the coordinator of a run that just failed keeps it up to {peer_timeout_s + LINGER_MARGIN_S} s"
            ) from e


def _wait_for_port(host: str, port: int, timeout_s: float, coordinator: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"coordinator {coordinator} not reachable within {timeout_s} s ({e.strerror or e}); "
                    "start process 0 first, check the address and that the port is open"
                ) from e
            time.sleep(0.2)


def check_batch(global_batch: int, devices: int, micro_steps: int = 1) -> None:
    """**Raises:** ValueError unless `global_batch` splits evenly over `devices` x `micro_steps`."""
    if micro_steps < 1:
        raise ValueError(f"micro-batches must be at least 1, got {micro_steps}")
    if global_batch % (devices * micro_steps):
        split = f"{devices} devices" + (f" x {micro_steps} micro-batches" if micro_steps > 1 else "")
        raise ValueError(
            f"global batch {global_batch} does not divide over {split}; use a multiple of {devices * micro_steps}"
        )


def place(tree: Any, sharding: NamedSharding) -> Any:
    # Each process passes what it holds: its rows of a sharded batch, or the whole of a
    # replicated value (the same in every process, drawn from the same seed).
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def pmap_train_step(micro_steps: int = 1) -> Callable:
    """`apply_step` under `jax.pmap` over the local devices, state donated.

    **Arguments** of the returned function: a replicated state; a batch of shape
    (devices, per device, ...). **Returns:** (replicated state, replicated metrics).
    """
    body = functools.partial(apply_step, axis_name=PMAP_AXIS, micro_steps=micro_steps)
    return jax.pmap(body, axis_name=PMAP_AXIS, in_axes=(None, 0), out_axes=(None, None), donate_argnums=0)


def sharded_train_step(mesh: Mesh, micro_steps: int = 1) -> Callable:
    """`apply_step` under `jax.jit` with the state replicated and the batch split along `mesh`'s "data" axis."""
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    body = functools.partial(apply_step, micro_steps=micro_steps)
    return jax.jit(body, in_shardings=(replicated, split), out_shardings=(replicated, replicated), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Where the state and batches live and which compiled step runs; see `make_parallel`."""

    mode: str
    mesh: Mesh | None
    step: Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]

    @property
    def axis(self) -> str:
        return PMAP_AXIS if self.mode == "pmap" else DATA_AXIS

    def put_state(self, state: TrainState) -> TrainState:
        """The state replicated on every device of the mesh (unchanged for "none")."""
        return state if self.mesh is None else place(state, NamedSharding(self.mesh, P()))

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This process's part of a training batch, placed for `step`.

        **Arguments:** image (n, H, W, 3), label (n,), mask (n,) with n = global batch
        / processes. **Returns:** for "pmap" arrays of shape (devices, n / devices,
        ...), for "sharded" the global arrays (N, ...) split over the devices.
        """
        batch = device_batch(batch)
        if self.mode == "pmap":
            d = self.mesh.size
            batch = {k: v.reshape((d, v.shape[0] // d) + v.shape[1:]) for k, v in batch.items()}
        return self.put_eval_batch(batch)

    def put_eval_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This process's part of a batch as global arrays split along the mesh (for the jitted `eval_step`)."""
        batch = device_batch(batch)
        return batch if self.mesh is None else place(batch, NamedSharding(self.mesh, P(self.axis)))


def check_parallel_mode(mode: str) -> None:
    """**Raises:** ValueError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; expected one of {', '.join(MODES)}")


def make_parallel(mode: str, *, global_batch: int, micro_steps: int = 1) -> Parallel:
    """The training step for `mode` ("none", "pmap", "sharded") on every device this run sees.

    "none" is the single-device `train_step`; "pmap" uses this process's devices
    and needs a single process; "sharded" uses the devices of all processes.
    **Raises:** ValueError for an unknown mode, "pmap" across processes, or a
    global batch that does not split over devices x micro-batches.
    """
    check_parallel_mode(mode)
    if mode == "towers":
        raise ValueError("parallel mode 'towers' needs the model: build it with distributed.towers.make_towers")
    if mode == "none":
        if jax.process_count() > 1:
            raise ValueError(f"parallel mode 'none' cannot span {jax.process_count()} processes; use 'sharded'")
        check_batch(global_batch, 1, micro_steps)
        return Parallel(mode, None, functools.partial(train_step, micro_steps=micro_steps))
    if mode == "pmap":
        if jax.process_count() > 1:
            raise ValueError(f"parallel mode 'pmap' here runs in one process, not {jax.process_count()}; use 'sharded'")
        check_batch(global_batch, jax.local_device_count(), micro_steps)
        mesh = Mesh(np.asarray(jax.local_devices()), (PMAP_AXIS,))
        return Parallel(mode, mesh, pmap_train_step(micro_steps))
    check_batch(global_batch, jax.device_count(), micro_steps)
    mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    return Parallel(mode, mesh, sharded_train_step(mesh, micro_steps))


def over_processes(*values: int) -> np.ndarray:
    """`values` from every process, shape (processes, len(values)); also a barrier across processes."""
    if jax.process_count() == 1:
        return np.asarray([values], np.int32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32))).reshape(-1, len(values))


def sum_over_processes(value: int) -> int:
    # Each process reads only its shard of the data, so it sees only its own unreadable files.
    return int(over_processes(value).sum())
