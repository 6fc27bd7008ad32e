"""The training loop end to end: learning, SIGKILL/SIGTERM and exact resume, workdir ownership, CLI errors.

On the tests' tiny network (`tiny_arch`): what is under test is the loop, not AlexNet's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from alexnet_jax import load_variables, save_variables
from alexnet_jax.steps import create_train_state, init_params, make_optimizer
from alexnet_jax.training.checkpoint import Checkpoints
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.loop import NonFiniteLossError, train_and_evaluate
from alexnet_jax.training.metrics import read_metrics
from alexnet_jax.training.recipe import lr_for_recipe
from alexnet_jax.training.workdir import WorkdirBusyError, WorkdirLock

from helpers import REPO, TRAIN_TINY, gone, pythonpath_with_tests, run_python
from tiny_arch import tiny_config, tiny_model, train_flags


@pytest.fixture(scope="module")
def data(colour_data, tiny):
    """24 training and 9 validation images of 3 colours, with "tiny" registered for the module."""
    return colour_data(8, 3)


def _config(data, **fields) -> TrainConfig:
    return tiny_config(data, **{"epochs": 2, "batch_size": 6, "save_every": 3, **fields})


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """An uninterrupted 4-step run (24 images, 2 steps per epoch; saves at 2, 3, 4)."""
    config = _config(data, batch_size=12)
    workdir = tmp_path_factory.mktemp("straight")
    return config, workdir, train_and_evaluate(config, workdir)


# Right after epoch 1's checkpoint (its metrics line must survive). A stop mid-epoch is the
# SIGTERM test's (step 1), resumed bit-identically the same way.
@pytest.mark.parametrize("kill_at", [2])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_and_resumed_run_ends_with_the_same_parameters(straight_run, tmp_path, kill_at):
    """Bit-exact: the resumed run replays the same batches, dropout keys and XLA programs on the same CPU."""
    config, straight_dir, straight = straight_run
    killed = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from alexnet_jax import TrainConfig, train_and_evaluate\n"
        "from tiny_arch import register\n"
        "register()\n"
        "config = TrainConfig(**__import__('json').loads(sys.argv[1]))\n"
        "def kill(step):\n"
        f"    if step == {kill_at}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_and_evaluate(config, sys.argv[2], on_checkpoint=kill)\n"
    )
    run = run_python(["-c", script, json.dumps(dataclasses.asdict(config)), killed], env=pythonpath_with_tests())
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


@pytest.mark.slow  # the fast loop keeps learning, fine-tuning and the workdir rules
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+) .*last good checkpoint is step"):
        train_and_evaluate(_config(data, lr=1e8, save_every=1), tmp_path)
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    step = checkpoints.latest_step()
    assert step is not None and not (tmp_path / "final.msgpack").exists()
    model = tiny_model(3)
    tx = make_optimizer(lr_for_recipe("torchvision", 1e8, steps_per_epoch=4))  # the run's optimizer structure
    template = create_train_state(model, init_params(model, seed=0), tx, seed=0)
    state, _ = checkpoints.restore(template)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_fine_tuning_replaces_the_head_and_can_freeze_the_features(data, tmp_path):
    source, before = tmp_path / "imagenet_like.msgpack", init_params(tiny_model(1000), seed=1, image_size=64)
    save_variables(source, {"params": before})
    train_and_evaluate(
        _config(data, epochs=1, save_every=0, init_from=str(source), freeze_features=True), tmp_path / "run"
    )
    after = load_variables(tmp_path / "run" / "final.msgpack")["params"]
    assert after["classifier_6"]["kernel"].shape == (4096, 3)
    np.testing.assert_array_equal(after["features_0"]["kernel"], before["features_0"]["kernel"])
    assert not np.array_equal(after["classifier_4"]["kernel"], before["classifier_4"]["kernel"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_python(["examples/train.py", *args], timeout=120)


@pytest.mark.slow
@pytest.mark.multiprocess
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
# A file, not `python -c`: the Grain worker, a spawned process, imports it again as its
# `__main__`, which registers "tiny" there too (see train_tiny.py).
_SIGTERM_CHILD = """
import contextlib, os, signal, sys
from multiprocessing import resource_tracker
from pathlib import Path

from tiny_arch import register, run_train_script

register()


def main():
    import alexnet_jax.training.loop as train
    from helpers import children

    attached, register_name = [], resource_tracker.register

    def record(name, rtype):
        if rtype == "shared_memory":
            attached.append(name)
        register_name(name, rtype)

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
    pids_path, names_path = sys.argv[1], sys.argv[2]
    try:
        run_train_script(sys.argv[3:])
    finally:
        Path(names_path).write_text(" ".join(attached))


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_saves_at_the_step_boundary_and_resume_is_bit_identical(straight_run, tmp_path):
    """Slurm, Kubernetes and preemptible VMs send SIGTERM: one line and nothing else, a checkpoint at step 1
    (which no rule saves), exit 143, the worker gone, no shared memory left, and --resume ends where the
    uninterrupted run did."""
    config, straight_dir, straight = straight_run
    workdir, pids, names = tmp_path / "run", tmp_path / "workers.txt", tmp_path / "shared_memory.txt"
    child = tmp_path / "sigterm_child.py"
    child.write_text(_SIGTERM_CHILD)
    args = train_flags(dataclasses.replace(config, workers=1), workdir)
    run = run_python([child, pids, names, *args], env=pythonpath_with_tests(), timeout=120)
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


@pytest.mark.slow
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


@pytest.mark.slow  # a holder process; test_workdir_with_checkpoints_... is the fast workdir test
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


# The tiny network's checkpoint (parameters and momentum, ~1.4 MB) is written as one file of ~1.3 MB.
DISK_BYTES = 500_000


def _small_disk() -> None:
    # A full disk, faked (a small tmpfs needs root): writes past DISK_BYTES fail with EFBIG, in
    # TensorStore's C++ as in Python, once SIGXFSZ no longer kills the process.
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_BYTES, resource.RLIM_INFINITY))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_full_disk_during_a_checkpoint_is_one_line_from_the_cli(data, tmp_path):
    """Before: 413 lines. Now one, naming the folder and the size of the state it saves; nothing half-written."""
    config = _config(data, epochs=1, batch_size=12, save_every=1)
    run = subprocess.run(
        [sys.executable, TRAIN_TINY, *train_flags(config, tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_small_disk,
    )
    model = tiny_model(3)
    tx = make_optimizer(lr_for_recipe("torchvision", config.lr, steps_per_epoch=2))  # the run's state structure
    state = create_train_state(model, init_params(model, seed=0), tx, seed=0)
    needed = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))  # as the checkpoint counts
    assert needed > DISK_BYTES
    assert run.returncode == 1, run.stderr
    # EFBIG is the file-size limit, and the line says so (a full disk says "Free some space").
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(
        f"error: {tmp_path / 'checkpoints' / '1'}: checkpoint not written (File too large); a file may not grow "
        f"past this process's file-size limit ({DISK_BYTES / 1e6:,.1f} MB, `ulimit -f`), and writing it needs "
        f"about {needed / 1e6:,.1f} MB. Raise the limit"
    ), run.stderr
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    from alexnet_jax.training.metrics import truncate_metrics as _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6, "val_lo')  # killed mid-append after step 6
    _truncate_metrics(path, 4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_checkpoint_damaged_in_place_is_set_aside_in_one_line_and_the_run_resumes(data, tmp_path):
    config, run = _config(data, batch_size=12, keep=3), tmp_path / "run"  # saves at steps 2, 3, 4
    train_and_evaluate(config, run)
    (run / "final.msgpack").unlink()  # a run stopped after its last checkpoint, before its results
    (run / "curves.png").unlink()
    newest = run / "checkpoints" / "4"
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    middle = len(data) // 2  # 4 KiB overwritten in place: the file's size is unchanged
    largest.write_bytes(data[:middle] + bytes(4096) + data[middle + 4096 :])
    done = run_python([TRAIN_TINY, *train_flags(config, run), "--resume"], env=pythonpath_with_tests(), timeout=120)
    assert done.returncode == 0, done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: checkpoint {newest} is damaged"), done.stderr
    assert "moved to damaged-4" in err[0]
    assert Checkpoints(run / "checkpoints").all_steps() == [2, 3, 4]  # step 4 trained and saved again


@pytest.mark.slow  # training runs: the fast loop keeps the loop's other tests
def test_resume_refuses_changed_data_and_fewer_epochs_in_one_line_and_writes_nothing(data, tmp_path):
    train, val = (shutil.copytree(folder, tmp_path / folder.name) for folder in data)
    workdir, config = tmp_path / "run", _config((train, val), epochs=2, batch_size=12)
    train_and_evaluate(config, workdir)
    written = {name: (workdir / name).read_bytes() for name in ("config.json", "data.json", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"2 epoch\(s\) are done already, so --epochs 1 leaves nothing to train; "):
        train_and_evaluate(dataclasses.replace(config, epochs=1), workdir, resume=True)
    with pytest.raises(ValueError, match=r"--epochs 2 leaves nothing to train; pass --epochs 3 or more"):
        train_and_evaluate(config, workdir, resume=True)
    shutil.copy(train / "class_0" / "0.png", train / "class_0" / "extra.png")
    with pytest.raises(ValueError, match=r"the training data changed since this run began \(24 images then, 25 now\)"):
        train_and_evaluate(dataclasses.replace(config, epochs=3), workdir, resume=True)
    (train / "class_0" / "extra.png").unlink()
    (train / "class_0" / "0.png").write_bytes((train / "class_0" / "1.png").read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"same 24 images in number, but files were renamed, replaced or changed"):
        train_and_evaluate(dataclasses.replace(config, epochs=3), workdir, resume=True)
    assert {name: (workdir / name).read_bytes() for name in written} == written


@pytest.mark.slow  # training runs: the fast loop keeps the loop's other tests
def test_allowed_data_change_goes_on_with_consistent_epochs_and_says_so(data, tmp_path, capsys):
    train, val = (shutil.copytree(folder, tmp_path / folder.name) for folder in data)
    workdir, config = tmp_path / "run", _config((train, val), epochs=2, batch_size=12)  # 2 steps per epoch
    train_and_evaluate(config, workdir)
    for c in range(3):  # 24 -> 36 images: 3 steps per epoch from now on
        for i in range(4):
            shutil.copy(train / f"class_{c}" / f"{i}.png", train / f"class_{c}" / f"more_{i}.png")
    more = dataclasses.replace(config, epochs=4, allow_data_change=True)
    last = train_and_evaluate(more, workdir, resume=True)
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4), (3, 7), (4, 10)]
    assert rows[2]["data_changed"] == "24 images then, 36 now" and "data_changed" not in rows[3]
    assert last["epoch"] == 4
    assert "epoch 3 starts on the new data at step 4" in capsys.readouterr().err
    # StepLR counts the loop's epochs: from step 4 (2 epochs done) an epoch is 3 steps, so with drops every
    # 3 epochs the rate drops at step 7, where epoch 4 begins (a schedule blind to the change: at step 9).
    schedule = lr_for_recipe("torchvision", 0.1, 3, step_epochs=3, epoch_base=(4, 2))
    assert [round(float(schedule(count)), 6) for count in (4, 6, 7, 9)] == [0.1, 0.1, 0.01, 0.01]
    # Resuming again keeps the new arithmetic: the data now is what data.json records.
    again = train_and_evaluate(dataclasses.replace(more, epochs=5, allow_data_change=False), workdir, resume=True)
    assert again["epoch"] == 5 and read_metrics(workdir / "metrics.jsonl")[-1]["step"] == 13


@pytest.mark.slow  # training runs: the fast loop keeps the loop's other tests
def test_half_precision_weights_are_cast_for_training_in_one_line(data, tmp_path, capsys):
    source = tmp_path / "half.msgpack"
    params = init_params(tiny_model(3), seed=1, image_size=64)
    save_variables(source, {"params": jax.tree.map(lambda x: np.asarray(x).astype(np.float16), params)})
    train_and_evaluate(_config(data, epochs=1, save_every=0, init_from=str(source)), tmp_path / "run")
    assert f"warning: {source}: weights stored as float16; cast to float32 for training" in capsys.readouterr().err
    final = load_variables(tmp_path / "run" / "final.msgpack")["params"]
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(final)} == {np.dtype(np.float32)}
