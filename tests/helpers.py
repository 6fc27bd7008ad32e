"""What several test modules need: Python in a fresh process, as a user runs it, and its child processes;
two-process training runs; free ports, shared memory, small image folders, relative differences."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# examples/train.py with the tests' tiny network registered (tiny_arch.py): what orchestration tests run.
TRAIN_TINY = TESTS / "train_tiny.py"
# One class per dominant colour: learnable in a few steps, by AlexNet and by the tiny network.
COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))


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


@functools.cache
def load_script(path: str | os.PathLike) -> ModuleType:
    """The script at `path` imported as a module named after its file (its main guard does not run); once per
    session, so every test module that calls into a script shares one copy."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def slow_after(n: int, values: Iterable, *, unpack: bool = False) -> list:
    """Parameters for `pytest.mark.parametrize`: the first `n` of `values` as they are, the rest marked slow.

    The fast loop (`-m "not slow"`) keeps a representative case, the full suite runs all.
    `unpack`: each value is a tuple of several arguments (parametrize("a, b", ...)).
    """
    return [
        value if i < n else pytest.param(*(value if unpack else (value,)), marks=pytest.mark.slow)
        for i, value in enumerate(values)
    ]


def pythonpath_with_tests() -> dict[str, str]:
    """{"PYTHONPATH": ...} with this folder first: for `python -c` children that import the test helpers."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS), os.environ.get("PYTHONPATH"))))}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_memory(pids: Iterable[int]) -> set[str]:
    """The /dev/shm entries (batches, semaphores) that `pids` have mapped or open, by name."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for path in [line.split(None, 5)[-1] for line in maps if "/dev/shm/" in line] + fds:
            if path.startswith("/dev/shm/"):
                names.add(path.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
    return names


def colour_folder(
    root: Path,
    per_class: int,
    seed: int,
    *,
    colours: Sequence[tuple[int, int, int]] = COLOURS,
    shape: tuple[int, int] = (64, 64),
    noise: float = 40,
) -> Path:
    """An ImageFolder at `root`: class_<i>/<j>.png, `per_class` noisy images of each colour; returns `root`."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(colours):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, noise, (*shape, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def relative_difference(a, b) -> float:
    """The largest |a - b| over each tensor's largest |b|, over all tensors of two pytrees (0 where both are 0)."""
    import jax

    def relative(x, y) -> float:
        scale, diff = np.max(np.abs(y)), np.max(np.abs(x - y))
        return float(diff / scale) if scale else (0.0 if diff == 0 else float("inf"))

    return max(jax.tree.leaves(jax.tree.map(relative, a, b)))


def single_device_env() -> dict[str, str]:
    """This environment for a process of a multi-process run: one CPU device, no process settings of JAX's."""
    dropped = ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def launch_train(args: Sequence[str], port: int, process_id: int, **popen) -> subprocess.Popen:
    """`tests/train_tiny.py args` as process `process_id` of a two-process sharded run through 127.0.0.1:`port`.

    stderr is piped; `popen` adds to subprocess.Popen's arguments.
    """
    cmd = [sys.executable, str(TRAIN_TINY), *args, "--parallel", "sharded", "--coordinator", f"127.0.0.1:{port}"]
    cmd += ["--num-processes", "2", "--process-id", str(process_id), "--init-timeout", "60"]
    return subprocess.Popen(cmd, cwd=REPO, env=single_device_env(), stderr=subprocess.PIPE, text=True, **popen)


def end(procs: Iterable[subprocess.Popen]) -> None:
    """Kills whichever of `procs` still runs."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def two_processes(args: Sequence[str], timeout: float) -> list[tuple[int, str, str]]:
    """`tests/train_tiny.py args` as processes 0 and 1 of a run on 127.0.0.1; (returncode, stdout, stderr) each."""
    port, procs = free_port(), []
    try:
        for i in range(2):
            procs.append(launch_train(args, port, i, stdout=subprocess.PIPE))
        deadline = time.monotonic() + timeout
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        end(procs)
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
