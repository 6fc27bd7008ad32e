"""Process 0's coordination service in a process of its own; started by `peers.CoordinatorService`.

    python coordinator_service.py BIND_ADDRESS NUM_PROCESSES HEARTBEAT_TIMEOUT_S LINGER_S RECOVERABLE SHUTDOWN_TIMEOUT_S

Prints "ready" once it serves, then reads standard input: "done" (process 0 is past JAX's
shutdown barrier, so every process is) ends it at once; end of input without it (process 0
was killed or left after a failure) keeps it serving LINGER_S more seconds, so the other
processes end by their own one-line watch instead of jaxlib's abort on a lost service.
The other arguments are what `jax.distributed.initialize` gives its own service.
Run as a script, not as part of the package: it imports jaxlib's extension alone (through
`alexnet_jax/upstream.py`, loaded by path), not JAX or the package.
"""

import importlib.util
import signal
import sys
import time
from pathlib import Path


def _load_upstream():
    # By path: importing the package would import JAX and Flax (seconds, hundreds of MB).
    path = Path(__file__).resolve().parents[1] / "upstream.py"
    spec = importlib.util.spec_from_file_location("alexnet_jax_upstream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    bind_address, num_processes, heartbeat_timeout_s, linger_s, recoverable, shutdown_timeout_s = argv
    # A scheduler signals every process of a job at a stop; the trainers still need the
    # service to agree on the stop and save. It ends by "done", by lingering, or by SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    upstream = _load_upstream()
    try:
        service = upstream.distributed_runtime_service(
            bind_address,
            int(num_processes),
            heartbeat_timeout=int(heartbeat_timeout_s),
            shutdown_timeout=int(shutdown_timeout_s),
            recoverable=recoverable == "1",
        )
    except Exception as e:  # for the parent's one-line error
        text = str(e).strip()
        print(text.splitlines()[0] if text else type(e).__name__, flush=True)
        return 1
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "done":
        time.sleep(float(linger_s))
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
