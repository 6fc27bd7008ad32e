"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) against one process, and bad launches.

Each child is the training CLI (`tests/train_tiny.py`, examples/train.py with the tests' tiny
network) with `--parallel sharded` and one CPU device: it reads only its half of every
global batch, and process 0 alone writes the logs and final weights. The children are
bounded by a timeout and killed in `finally`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from alexnet_jax import load_variables
from alexnet_jax.training.loop import train_and_evaluate
from alexnet_jax.training.metrics import read_metrics

from helpers import (
    TRAIN_TINY,
    free_port,
    relative_difference,
    run_python,
    single_device_env,
    slow_after,
    two_processes,
)
from tiny_arch import tiny_config, train_flags

TIMEOUT_S = 240
# The two runs sum the gradients of the same 8 images in another order (two halves,
# then an all-reduce); after 2 SGD steps that stays far below this, relative to each
# tensor's largest value.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data(colour_data, tiny):
    return colour_data(6, 2)  # 18 images: 2 steps of 8


def _args(data, workdir: Path) -> list[str]:
    return train_flags(tiny_config(data, lr=0.01), workdir)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_end_with_the_parameters_of_one(data, tmp_path):
    """Dropout is on: the sharded jit draws the masks of the global batch, the same in both runs."""
    single = train_and_evaluate(tiny_config(data, lr=0.01), tmp_path / "single")

    workdir = tmp_path / "two"
    results = two_processes(_args(data, workdir), TIMEOUT_S)
    for i, (returncode, _, err) in enumerate(results):
        assert returncode == 0, f"process {i}: {err[-3000:]}"
    assert "done:" in results[0][1] and "done:" not in results[1][1]  # process 0 reports

    two = load_variables(workdir / "final.msgpack")["params"]
    one = load_variables(single["final_variables"])["params"]
    assert relative_difference(two, one) < TOLERANCE
    rows = read_metrics(workdir / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 2  # written once, by process 0
    assert rows[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert rows[0]["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def _run(args: list[str], timeout: float = 60):
    return run_python([TRAIN_TINY, *args], env=single_device_env(), timeout=timeout)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_unreachable_coordinator_fails_fast_with_one_line(data, tmp_path):
    started = time.monotonic()
    run = _run(
        _args(data, tmp_path / "w")
        + [
            "--coordinator",
            f"127.0.0.1:{free_port()}",
            "--num-processes",
            "2",
            "--process-id",
            "1",
            "--init-timeout",
            "2",
        ]
    )
    assert run.returncode == 1, run.stderr
    assert "not reachable within 2 s" in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "w").exists()  # nothing started


@pytest.mark.parametrize(
    "extra, message",
    slow_after(
        1,
        [
            (["--num-processes", "2", "--process-id", "2"], "process id 2 is out of range for 2 processes"),
            (["--num-processes", "2", "--process-id", "-1"], "process id -1 is out of range for 2 processes"),
            (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "1"], "is not HOST:PORT"),
        ],
        unpack=True,
    ),
)
@pytest.mark.multiprocess
def test_bad_process_arguments_are_refused_before_connecting(data, tmp_path, extra, message):
    coordinator = [] if "--coordinator" in extra else ["--coordinator", f"127.0.0.1:{free_port()}"]
    run = _run(_args(data, tmp_path / "w") + coordinator + extra, timeout=30)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_batch_that_does_not_split_over_the_devices_stops_before_training(data, tmp_path):
    """Two processes of one device each: a global batch of 7 cannot split; both say so and exit."""
    args = _args(data, tmp_path / "w")
    args[args.index("--batch-size") + 1] = "7"
    for returncode, _, err in two_processes(args, 90):
        assert returncode == 1, err
        assert "global batch 7 does not divide over 2 devices; use a multiple of 2" in err
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_peer_that_never_arrives_ends_the_run_with_one_line_and_exit_1(data, tmp_path):
    """Before: jaxlib aborted (SIGABRT, a C++ stack) after its own timeout. Process 0 alone, 3 s to wait."""
    started = time.monotonic()
    args = _args(data, tmp_path / "w") + ["--parallel", "sharded", "--coordinator", f"127.0.0.1:{free_port()}"]
    run = _run(args + ["--num-processes", "2", "--process-id", "0", "--init-timeout", "3"], timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1].startswith("error: process 0: not all 2 processes joined through 127.0.0.1:")
    assert "within 3 s" in run.stderr and "Traceback" not in run.stderr and "Check failure" not in run.stderr
    assert time.monotonic() - started < 40


def test_process_0_learns_it_is_process_0_from_the_cluster_before_jax_starts(monkeypatch):
    """On Slurm (and Open MPI, k8s, TPU) nothing is given: process 0 must still know, to serve the coordinator
    from a process of its own. JAX's own detection answers; outside a cluster nothing is made up."""
    from alexnet_jax.distributed.parallel import _detect

    for name in os.environ:
        if name.startswith(("SLURM_", "OMPI_", "JAX_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(name)
    assert _detect(None, None, None, 10) == (None, None, None)
    slurm = {"SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    for name, value in {**slurm, "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}.items():
        monkeypatch.setenv(name, value)
    coordinator, processes, process = _detect(None, None, None, 10)
    assert coordinator.startswith("node3:") and (processes, process) == (2, 0)
    assert _detect("10.0.0.1:1234", 4, 3, 10) == ("10.0.0.1:1234", 4, 3)  # given: used as given


@pytest.mark.slow
@pytest.mark.multiprocess
def test_jax_can_still_be_configured_after_joining(tmp_path):
    """JAX allows config updates between jax.distributed.initialize and the first computation;
    initialize_distributed must not start the backend (it asked jax.process_count() before)."""
    script = (
        "import sys, jax\n"
        "from alexnet_jax.distributed.parallel import initialize_distributed\n"
        "initialize_distributed(sys.argv[1], 1, 0)\n"
        "jax.config.update('jax_num_cpu_devices', 2)\n"
        "print(jax.device_count())\n"
    )
    run = run_python(["-c", script, f"127.0.0.1:{free_port()}"], env=single_device_env(), timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["2"], run.stderr
