"""The training loop end to end: learning, SIGKILL/SIGTERM and exact resume, workdir ownership, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import AlexNet, load_variables, save_variables
from alexnet_jax.steps import create_train_state, init_params, make_optimizer
from alexnet_jax.training.checkpoint import Checkpoints
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.loop import NonFiniteLossError, train_and_evaluate
from alexnet_jax.training.metrics import read_metrics
from alexnet_jax.training.recipe import lr_for_recipe
from alexnet_jax.training.workdir import WorkdirBusyError, WorkdirLock

from helpers import REPO, children, gone, run_python

COLORS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))  # one class per dominant colour: learnable in a few steps


def _colour_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLORS):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, (64, 64, 3))
            pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return _colour_folder(root / "train", 8, 0), _colour_folder(root / "val", 3, 1)


def _config(data, **kw) -> TrainConfig:
    train, val = data
    # XLA's convolution unless a test asks for the default: these tests are about the loop,
    # and it compiles in a fraction of the Winograd layers' seconds.
    defaults = dict(
        data=str(train),
        val_data=str(val),
        epochs=2,
        batch_size=6,
        lr=0.01,
        image_size=64,
        save_every=3,
        keep=1,
        progress=False,
        conv_algorithm="xla",
    )
    return TrainConfig(**{**defaults, **kw})


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """An uninterrupted 4-step run (24 images, 2 steps per epoch; saves at 2, 3, 4)."""
    config = _config(data, batch_size=12)
    workdir = tmp_path_factory.mktemp("straight")
    return config, workdir, train_and_evaluate(config, workdir)


# Right after epoch 1's checkpoint (its metrics line must survive). A stop mid-epoch is the
# SIGTERM test's (step 1), resumed bit-identically the same way.
@pytest.mark.parametrize("kill_at", [2])
def test_killed_and_resumed_run_ends_with_the_same_parameters(straight_run, tmp_path, kill_at):
    """Bit-exact: the resumed run replays the same batches, dropout keys and XLA programs on the same CPU."""
    config, straight_dir, straight = straight_run
    killed = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from alexnet_jax import TrainConfig, train_and_evaluate\n"
        "config = TrainConfig(**__import__('json').loads(sys.argv[1]))\n"
        "def kill(step):\n"
        f"    if step == {kill_at}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_and_evaluate(config, sys.argv[2], on_checkpoint=kill)\n"
    )
    run = run_python(["-c", script, json.dumps(dataclasses.asdict(config)), killed])
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not (killed / "final.msgpack").exists()
    assert Checkpoints(killed / "checkpoints").latest_step() == kill_at
    assert [m["step"] for m in read_metrics(killed / "metrics.jsonl")] == [2]

    resumed = train_and_evaluate(config, killed, resume=True)
    ours, theirs = load_variables(killed / "final.msgpack"), load_variables(straight_dir / "final.msgpack")
    for layer in theirs["params"]:
        for leaf in theirs["params"][layer]:
            np.testing.assert_array_equal(ours["params"][layer][leaf], theirs["params"][layer][leaf], err_msg=layer)
    assert read_metrics(killed / "metrics.jsonl") == read_metrics(straight_dir / "metrics.jsonl")
    assert resumed == {**straight, "final_variables": str(killed / "final.msgpack")}


def test_a_short_run_learns_and_writes_metrics_curves_and_weights(data, tmp_path):
    last = train_and_evaluate(_config(data, epochs=4, save_every=0, conv_algorithm="auto"), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "epoch", "train_loss", "val_loss", "val_top1", "val_top5"} <= set(rows[0])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert last["val_top1"] >= 0.8, rows  # chance is 1/3
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert load_variables(tmp_path / "final.msgpack")["params"]["classifier_6"]["kernel"].shape == (4096, 3)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+) .*last good checkpoint is step"):
        train_and_evaluate(_config(data, lr=1e8, save_every=1), tmp_path)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    step = checkpoints.latest_step()
    assert step is not None and not (tmp_path / "final.msgpack").exists()
    model = AlexNet(num_classes=3)
    tx = make_optimizer(lr_for_recipe("torchvision", 1e8, steps_per_epoch=4))  # the run's optimizer structure
    template = create_train_state(model, init_params(model, seed=0), tx, seed=0)
    state, _ = checkpoints.restore(template)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_fine_tuning_replaces_the_head_and_can_freeze_the_features(data, tmp_path, flax_variables):
    source = tmp_path / "imagenet_like.msgpack"
    save_variables(source, flax_variables(0, 1000))
    train_and_evaluate(
        _config(data, epochs=1, save_every=0, init_from=str(source), freeze_features=True), tmp_path / "run"
    )
    before, after = flax_variables(0, 1000)["params"], load_variables(tmp_path / "run" / "final.msgpack")["params"]
    assert after["classifier_6"]["kernel"].shape == (4096, 3)
    np.testing.assert_array_equal(after["features_0"]["kernel"], before["features_0"]["kernel"])
    assert not np.array_equal(after["classifier_4"]["kernel"], before["classifier_4"]["kernel"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(["examples/train.py", *args], timeout=120)


def test_cli_reports_bad_input_in_one_line(data, tmp_path):
    train, val = data
    base = [
        "--data",
        str(train),
        "--val-data",
        str(val),
        "--workdir",
        str(tmp_path / "w"),
        "--no-progress",
        "--batch-size",
        "6",
    ]
    cases = [
        (
            ["--data", str(tmp_path / "nope"), "--val-data", str(val), "--workdir", str(tmp_path / "w")],
            1,
            "no such folder",
        ),
        ([*base, "--image-size", "32"], 2, "at least 63"),
        ([*base, "--resume"], 1, "no checkpoint to resume from"),
        ([*base, "--batch-size", "100"], 1, "less than one batch of 100"),
        ([*base, "--init-from", str(tmp_path / "missing.msgpack")], 1, "no such file"),
        ([*base, "--conv-algorithm", "fft"], 2, "invalid choice: 'fft'"),
    ]
    for args, code, message in cases:
        run = _cli(*args)
        assert run.returncode == code and message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_workdir_with_checkpoints_needs_resume_and_the_same_run(data, tmp_path):
    config = _config(data, epochs=1, save_every=0)
    train_and_evaluate(config, tmp_path)
    with pytest.raises(FileExistsError, match="pass --resume or use a new workdir"):
        train_and_evaluate(config, tmp_path)
    with pytest.raises(ValueError, match=r"cannot resume exactly with a different batch_size \(6 -> 4\)"):
        train_and_evaluate(dataclasses.replace(config, batch_size=4), tmp_path, resume=True)


def test_an_unknown_conv_algorithm_is_refused_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="unknown conv algorithm 'fft'; expected one of xla, winograd, auto"):
        train_and_evaluate(_config(data, conv_algorithm="fft"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# The CLI in a child, with a real SIGTERM to itself once step 1 has run (the wrapped batch
# iterator sends it when the loop asks for batch 2), its Grain worker's pid written down, and
# the names of the shared memory it attached (registered with the resource tracker) at its end.
_SIGTERM_CHILD = """
import contextlib, os, runpy, signal, sys
from multiprocessing import resource_tracker
from pathlib import Path
import alexnet_jax.training.loop as train
# children()

attached, register = [], resource_tracker.register

def record(name, rtype):
    if rtype == "shared_memory":
        attached.append(name)
    register(name, rtype)

resource_tracker.register = record

def batches(*args, **kwargs):
    with contextlib.closing(real(*args, **kwargs)) as inner:
        for i, batch in enumerate(inner):
            yield batch
            if i == 0:
                with open(pids_path, "w") as f:
                    f.write(" ".join(map(str, children(os.getpid()))))
                os.kill(os.getpid(), signal.SIGTERM)

real, train.train_batches = train.train_batches, batches
pids_path, names_path, sys.argv = sys.argv[1], sys.argv[2], ["examples/train.py", *sys.argv[3:]]
try:
    runpy.run_path("examples/train.py", run_name="__main__")
finally:
    Path(names_path).write_text(" ".join(attached))
"""


def test_sigterm_saves_at_the_step_boundary_and_resume_is_bit_identical(straight_run, tmp_path):
    """Slurm, Kubernetes and preemptible VMs send SIGTERM: one line and nothing else, a checkpoint at step 1
    (which no rule saves), exit 143, the worker gone, no shared memory left, and --resume ends where the
    uninterrupted run did."""
    import inspect

    config, straight_dir, straight = straight_run
    workdir, pids, names = tmp_path / "run", tmp_path / "workers.txt", tmp_path / "shared_memory.txt"
    child = _SIGTERM_CHILD.replace("# children()\n", inspect.getsource(children))
    args = ["--data", config.data, "--val-data", config.val_data, "--workdir", workdir, "--batch-size", "12"]
    args += ["--epochs", "2", "--lr", "0.01", "--image-size", "64", "--save-every", "3", "--keep", "1"]
    args += ["--no-progress", "--conv-algorithm", "xla", "--workers", "1"]
    run = run_python(["-c", child, pids, names, *args], env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 143, run.stderr
    # The stop line alone: before, on a loaded machine, Python's resource tracker sometimes
    # added its two-line "leaked shared_memory" warning (data._unlink_shared_memory says why).
    assert run.stderr.splitlines() == [
        f"stopped by SIGTERM at step 1: checkpoint in {workdir / 'checkpoints' / '1'}; continue with --resume"
    ], run.stderr
    assert Checkpoints(workdir / "checkpoints").all_steps() == [1]
    workers = [int(pid) for pid in pids.read_text().split()]  # Grain's worker and Python's resource tracker
    assert len(workers) == 2 and gone(workers, within_s=10), workers
    attached = names.read_text().split()  # "/psm_..."
    assert attached and not [name for name in attached if os.path.exists(f"/dev/shm{name}")], attached

    resumed = train_and_evaluate(config, workdir, resume=True)
    ours, theirs = load_variables(workdir / "final.msgpack"), load_variables(straight_dir / "final.msgpack")
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert read_metrics(workdir / "metrics.jsonl") == read_metrics(straight_dir / "metrics.jsonl")
    assert resumed == {**straight, "final_variables": str(workdir / "final.msgpack")}


def test_a_finished_run_is_kept_unless_overwrite_is_asked(data, tmp_path):
    config = _config(data, epochs=1, save_every=0, batch_size=12)
    old = {"final.msgpack": b"weights of the earlier run", "metrics.jsonl": b'{"step": 9}\n'}
    for name, content in old.items():
        (tmp_path / name).write_bytes(content)  # a finished run whose checkpoints/ was deleted
    with pytest.raises(FileExistsError, match=r"holds the results of a finished run \(final.msgpack, metrics.jsonl\)"):
        train_and_evaluate(config, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert not (tmp_path / "config.json").exists()

    train_and_evaluate(config, tmp_path, overwrite=True)
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [2]
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [2]


def test_a_workdir_is_owned_by_one_run_at_a_time(data, tmp_path):
    """A second run is refused before it writes anything, naming the holder; a SIGKILLed holder leaves no stale lock."""
    import socket

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom alexnet_jax.training.workdir import WorkdirLock\n"
            "WorkdirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(
            WorkdirBusyError, match=rf"in use by another run \(pid {holder.pid} on {socket.gethostname()}"
        ):
            train_and_evaluate(_config(data), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    with WorkdirLock(tmp_path):  # the kernel released the killed holder's lock
        pass


def test_an_unwritable_workdir_is_refused_before_training(data):
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys, a folder nobody can create files in (not even root)")
    with pytest.raises(OSError, match=r"workdir /sys/alexnet-run is not writable \("):
        train_and_evaluate(_config(data), "/sys/alexnet-run")


def _disk_of_50_mb() -> None:
    # A full disk, faked (a small tmpfs needs root): writes past 50 MB fail with EFBIG, in
    # TensorStore's C++ as in Python, once SIGXFSZ no longer kills the process.
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000_000, resource.RLIM_INFINITY))


def test_a_full_disk_during_a_checkpoint_is_one_line_from_the_cli(data, tmp_path):
    """Before: 413 lines. Now one, naming the folder and the ~456 MB the checkpoint needs; nothing half-written."""
    train, val = data
    args = ["--data", train, "--val-data", val, "--workdir", tmp_path, "--batch-size", "12", "--epochs", "1"]
    args += ["--lr", "0.01", "--image-size", "64", "--save-every", "1", "--no-progress", "--conv-algorithm", "xla"]
    run = subprocess.run(
        [sys.executable, REPO / "examples" / "train.py", *map(str, args), "--workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_disk_of_50_mb,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(
        f"error: {tmp_path / 'checkpoints' / '1'}: checkpoint not written (File too large); writing it needs about 4"
    ), run.stderr
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    from alexnet_jax.training.metrics import truncate_metrics as _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6, "val_lo')  # killed mid-append after step 6
    _truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'
