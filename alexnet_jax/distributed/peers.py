"""A lost peer of a multi-process run ends every other process with one line, not jaxlib's abort.

jaxlib ends a process with SIGABRT and a C++ stack trace (no Python exception, nothing to
catch, and its `missed_heartbeat_callback` cannot be given from Python: jaxlib throws
std::bad_cast when it fires) in the two cases a training run meets that no collective reports:

- process 0 dies: JAX runs the coordination service inside it, and every other process's
  client aborts the moment its connection to the service drops;
- a process freezes or dies while the others are not in a collective with it: the service
  declares it dead after the heartbeat timeout and every other client aborts.

So process 0 runs the service in a child process of its own (`CoordinatorService`, the
script `coordinator_service.py`), which outlives process 0 long enough for the others to
notice, and every process sends heartbeats through the service's key-value store and
watches the others' (`PeerWatch`): a peer silent for `timeout_s` ends this process with
one line and exit 1, before jaxlib's heartbeat timeout (set longer, as a backstop) aborts it.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alexnet_jax.errors import first_line

SERVICE_SCRIPT = Path(__file__).with_name("coordinator_service.py")
HEARTBEAT_PREFIX = "alexnet_jax/heartbeat/"
# How long the service serves on after process 0 vanished without saying "done": time for
# the other processes' watches to notice (timeout_s) and leave.
LINGER_MARGIN_S = 10
SHUTDOWN_TIMEOUT_S = 300  # jax.distributed.initialize's default for its own service


class CoordinatorService:
    """The coordination service of a run, in a child process of process 0 (see the module docstring).

    `close()` after JAX's shutdown barrier ends it at once; if process 0 ends without
    it (killed, or left after a failure), it serves `linger_s` more seconds and ends.
    It ignores SIGINT and SIGTERM (a scheduler signals every process of a job, and
    the processes still need the service to save their checkpoints at a stop).
    **Raises:** RuntimeError naming the address and why, when it does not start within `timeout_s`.
    """

    def __init__(
        self,
        bind_address: str,
        num_processes: int,
        *,
        heartbeat_timeout_s: int,
        linger_s: float,
        timeout_s: float,
        recoverable: bool = False,
        shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
    ):
        self.bind_address = bind_address
        self._process = subprocess.Popen(
            [sys.executable, str(SERVICE_SCRIPT), bind_address, str(num_processes), str(heartbeat_timeout_s)]
            + [str(linger_s), "1" if recoverable else "0", str(shutdown_timeout_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # jaxlib's logs of the service: what the one-line exits replace
            text=True,
            start_new_session=True,  # not in the terminal's process group: Ctrl-C reaches the trainers only
        )
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        line = self._process.stdout.readline().strip() if ready else ""
        if line != "ready":
            try:  # with its output closed it has ended, or is ending
                status = self._process.wait(timeout=5) if ready else None
            except subprocess.TimeoutExpired:
                status = None
            if status is None:
                self._process.kill()
                self._process.wait()
                how = f"not within {timeout_s:g} s"
            elif status < 0:  # jaxlib crashes (SIGSEGV) on an address it cannot bind
                how = f"it ended by {signal.Signals(-status).name}; is the address free and local?"
            else:
                how = line or f"it exited with status {status}"
            raise RuntimeError(f"the coordination service did not start on {bind_address}: {how}")

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self, timeout_s: float = 10) -> None:
        """Ends the service now; call only once every process is past JAX's shutdown barrier."""
        if self._process.poll() is not None:
            return
        try:
            self._process.stdin.write("done\n")
            self._process.stdin.close()
            self._process.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()


class PeerWatch:
    """Heartbeats through the coordination service's key-value store, and a watch on the other processes'.

    Every `interval_s` this process increments its own counter and reads all of them
    (one request each way; with N processes the service answers N such reads a second,
    fine for the hundreds of hosts a run has). When a peer's counter has not moved for
    `timeout_s`, or the service has not answered for `timeout_s` (a request to a host
    that froze or vanished blocks without a deadline, so requests run on a thread of
    their own and another judges the time since the last answer), `on_lost(message)` is
    called once and the watch ends. `client` is JAX's distributed runtime client (or
    anything with its `key_value_set` and `key_value_dir_get`). The threads are daemons;
    `stop()` ends the watch, and so does `active()` turning false (the program shut JAX's
    distributed runtime down itself).

    What it sees is a process that is gone or frozen (killed, stopped, its host down or
    cut off): the heartbeat has a thread of its own, so a process whose main thread is
    stuck (a deadlock, a read from a dead mount) keeps beating.
    """

    def __init__(
        self,
        client: Any,
        process_id: int,
        num_processes: int,
        *,
        timeout_s: float,
        on_lost: Callable[[str], Any],
        active: Callable[[], bool] = lambda: True,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if timeout_s <= interval_s:
            raise ValueError(
                f"peer timeout must be longer than the heartbeat interval ({interval_s:g} s), got {timeout_s:g}"
            )
        self._client, self._id, self._timeout, self._interval = client, process_id, timeout_s, interval_s
        self._peers = [p for p in range(num_processes) if p != process_id]
        self._on_lost, self._active, self._clock = on_lost, active, clock
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._beat, name="peer-heartbeat", daemon=True),
            threading.Thread(target=self._judge, name="peer-watch", daemon=True),
        ]
        self._beats = 0
        self._found: str | None = None  # a silent peer, as the heartbeat thread saw it
        self._last_error = ""
        now = clock()
        self._last_answer = now
        self._seen = {p: (None, now) for p in self._peers}  # peer -> (last counter, when it last changed)

    def start(self) -> PeerWatch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Ends the watch; returns without waiting for a request that is still blocked."""
        self._stop.set()
        judge = self._threads[1]
        if judge.is_alive() and judge is not threading.current_thread():
            judge.join(timeout=10 * self._interval)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def check(self) -> str | None:
        """One heartbeat and one look at the others: a message naming the silent peers, or None.

        A request that fails (the service did not answer) counts as no answer: see `unanswered`.
        """
        self._beats += 1
        try:
            self._client.key_value_set(f"{HEARTBEAT_PREFIX}{self._id}", str(self._beats), allow_overwrite=True)
            counters = dict(self._client.key_value_dir_get(HEARTBEAT_PREFIX))
        except Exception as e:  # jaxlib's runtime error: the service did not answer
            self._last_error = f": {first_line(e)}"
            return None
        now = self._clock()
        self._last_answer = now
        silent = []
        for peer in self._peers:
            counter = counters.get(f"{HEARTBEAT_PREFIX}{peer}")
            last, since = self._seen[peer]
            if counter != last:
                self._seen[peer] = (counter, now)
            elif now - since > self._timeout:
                silent.append(peer)
        if not silent:
            return None
        which = f"process {silent[0]}" if len(silent) == 1 else "processes " + ", ".join(map(str, silent))
        return (
            f"error: process {self._id}: lost contact with {which} of the run: no heartbeat for {self._timeout:g} s "
            "(it died, froze or is unreachable)"
        )

    def unanswered(self) -> str | None:
        """The message when the service has not answered for `timeout_s`, else None."""
        if self._clock() - self._last_answer <= self._timeout:
            return None
        return (
            f"error: process {self._id}: lost contact with the coordinator of the run: no answer for "
            f"{self._timeout:g} s (process 0's host is down, frozen or unreachable){self._last_error}"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            found = self.check()
            if found is not None:
                self._found = found
                return

    def _judge(self) -> None:
        while not self._stop.wait(self._interval):
            message = self._found or self.unanswered()
            if message is not None:
                if not self._stop.is_set() and self._active():
                    self._on_lost(message)
                self._stop.set()  # the heartbeat thread ends too
                return
