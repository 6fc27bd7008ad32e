"""The heartbeat watch (fake key-value store and clock) and the coordination service's own process."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from alexnet_jax.distributed.peers import HEARTBEAT_PREFIX, CoordinatorService, PeerWatch

from helpers import free_port, gone


class _Store:
    """The two calls PeerWatch makes on JAX's client, over a dict; `down` makes them fail like jaxlib does."""

    def __init__(self):
        self.values: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses\ndetails")
        assert allow_overwrite
        self.values[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
        return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _watch(store, clock, process_id=0, processes=3, timeout_s=10.0):
    return PeerWatch(store, process_id, processes, timeout_s=timeout_s, on_lost=pytest.fail, clock=clock)


def test_peers_that_beat_are_alive_and_a_silent_one_is_named_after_the_timeout():
    store, clock = _Store(), _Clock()
    watch = _watch(store, clock)
    for second in range(30):  # process 1 beats every second, process 2 stops after 5
        clock.now += 1
        store.values[f"{HEARTBEAT_PREFIX}1"] = str(second)
        if second < 5:
            store.values[f"{HEARTBEAT_PREFIX}2"] = str(second)
        message = watch.check()
        if message:
            break
    assert store.values[f"{HEARTBEAT_PREFIX}0"] == str(second + 1)  # this process's own counter
    assert second == 15  # last change at 5, silent for more than 10 s at 16 s
    assert message == (
        "error: process 0: lost contact with process 2 of the run: no heartbeat for 10 s "
        "(it died, froze or is unreachable)"
    )


def test_a_peer_that_never_beat_counts_from_the_start_of_the_watch():
    store, clock = _Store(), _Clock()
    watch = _watch(store, clock, process_id=1, processes=3)
    clock.now += 10
    assert watch.check() is None
    clock.now += 1
    assert watch.check().startswith("error: process 1: lost contact with processes 0, 2 of the run")


def test_a_coordinator_that_does_not_answer_is_named_after_the_timeout():
    store, clock = _Store(), _Clock()
    watch = _watch(store, clock)
    store.down = True
    clock.now += 10
    assert watch.check() is None and watch.unanswered() is None  # a blip is not a loss
    clock.now += 1
    assert watch.check() is None
    assert watch.unanswered() == (
        "error: process 0: lost contact with the coordinator of the run: no answer for 10 s "
        "(process 0's host is down, frozen or unreachable): RuntimeError: UNAVAILABLE: failed to connect to all "
        "addresses"
    )
    store.down = False
    watch.check()
    assert watch.unanswered() is None  # it answered again


class _FrozenStore(_Store):
    """A coordinator whose host froze: requests block (jaxlib's have no deadline) until `thaw` is set."""

    def __init__(self):
        super().__init__()
        self.thaw = threading.Event()

    def key_value_set(self, key, value, allow_overwrite=False):
        self.thaw.wait()
        super().key_value_set(key, value, allow_overwrite)


def test_a_request_that_never_returns_is_judged_by_the_other_thread():
    store, lost = _FrozenStore(), []
    watch = PeerWatch(store, 1, 2, timeout_s=0.3, interval_s=0.05, on_lost=lost.append).start()
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:  # the heartbeat thread stays blocked: wait for the judge
        time.sleep(0.05)
    time.sleep(0.2)
    assert len(lost) == 1 and lost[0].startswith("error: process 1: lost contact with the coordinator"), lost
    store.thaw.set()  # the blocked request returns, and the heartbeat thread sees the watch is over
    deadline = time.monotonic() + 5
    while watch.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watch.running and len(lost) == 1


def test_the_thread_calls_on_lost_once_and_stop_ends_it():
    store, lost = _Store(), []
    watch = PeerWatch(store, 0, 2, timeout_s=0.2, interval_s=0.05, on_lost=lost.append).start()
    time.sleep(0.6)
    watch.stop()
    assert len(lost) == 1 and "process 1" in lost[0]

    # on_lost runs on the watch's thread, where pytest.fail would not fail the test: collect instead.
    store.values[f"{HEARTBEAT_PREFIX}1"] = "1"
    quiet_lost = []
    quiet = PeerWatch(store, 0, 2, timeout_s=0.2, interval_s=0.05, on_lost=quiet_lost.append).start()
    quiet.stop()  # before the timeout: no call, and the threads end
    time.sleep(0.3)
    assert not quiet.running and quiet_lost == []

    # The program shut jax.distributed down itself: the store stops answering, and that is no loss.
    store.down = True
    after_lost = []
    after = PeerWatch(store, 0, 2, timeout_s=0.2, interval_s=0.05, on_lost=after_lost.append, active=lambda: False)
    after.start()
    time.sleep(0.6)
    assert not after.running and after_lost == []


def test_the_timeout_must_exceed_the_interval():
    with pytest.raises(ValueError, match="peer timeout must be longer than the heartbeat interval"):
        PeerWatch(_Store(), 0, 2, timeout_s=1, interval_s=1, on_lost=print)


def _serves(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_the_service_ends_at_done_and_lingers_after_its_parent_vanished():
    port = free_port()
    service = CoordinatorService(f"127.0.0.1:{port}", 2, heartbeat_timeout_s=10, linger_s=2, timeout_s=60)
    assert _serves(port)
    service.close()
    assert gone([service.pid], within_s=1) and not _serves(port)

    # Process 0 killed: its end of the pipe closes without "done"; the service serves on for linger_s.
    port = free_port()
    service = CoordinatorService(f"127.0.0.1:{port}", 2, heartbeat_timeout_s=10, linger_s=2, timeout_s=60)
    service._process.stdin.close()
    time.sleep(1)
    assert _serves(port)
    service._process.wait(timeout=10)
    assert not _serves(port)


def test_a_service_that_cannot_start_is_one_error():
    # jaxlib either raises or crashes (SIGSEGV) on a taken port, by the run: either way one line says so.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(
            RuntimeError,
            match=f"did not start on {address}: (UNKNOWN: Failed to start RPC server|it ended by SIGSEGV)",
        ):
            CoordinatorService(address, 2, heartbeat_timeout_s=10, linger_s=2, timeout_s=60)
