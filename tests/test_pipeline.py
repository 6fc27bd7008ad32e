"""The input pipeline's pixels: uint8 batches normalized on the device, reduced JPEG decoding, packed shards,
and workers started from a script without the `__main__` guard."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax.archs import ARCHS
from alexnet_jax.cli import run as cli_run
from alexnet_jax.steps import model_inputs
from alexnet_jax.training.loop import train_and_evaluate
from alexnet_jax.training.pack import pack_folder
from alexnet_jax.training.pipeline import (
    describe_worker_death,
    epoch_order,
    eval_batches,
    example_rng,
    image_folder,
    steps_per_epoch,
    train_batches,
)
from alexnet_jax.training.sources import DataError, open_data, open_shards
from alexnet_jax.transforms.augment import IMAGENET_PCA
from alexnet_jax.transforms.images import open_image, reduce_on_decode
from alexnet_jax.weights.serialization import load_variables

from helpers import REPO, TRAIN_TINY, children, load_script, pythonpath_with_tests, run_python
from tiny_arch import tiny_config

# Real photos as the JPEGs of an ImageNet-like folder: 500x375 and 375x500, quality 90.
SIZES = ((500, 375), (375, 500))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("jpegs")
    for i, (name, photo) in enumerate(sorted(photos.items())):
        for j, size in enumerate(SIZES):
            image = photo.resize(size, Image.BILINEAR)
            folder = root / ("cat" if (i + j) % 2 else "dog")
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{name}-{j}.jpg", quality=90)
    return root


def _float_batch(data, arch, size, seed, step, batch_size, colour_pca=None):
    # What the pipeline handed over before its batches were uint8: the float transforms, noise added on the host.
    per_epoch = steps_per_epoch(len(data), batch_size)
    epoch, b = divmod(step, per_epoch)
    images = []
    for j, i in enumerate(epoch_order(len(data), seed, epoch)[b * batch_size : (b + 1) * batch_size]):
        rng = example_rng(seed, epoch, step * batch_size + j)
        x = arch.train_transform(Image.open(data.samples[i][0]), size, rng)
        images.append(x if colour_pca is None else colour_pca.apply(x, rng))
    return np.stack(images)


@pytest.mark.parametrize(("arch", "size", "pca"), [("torchvision", 64, None), ("2012", 227, IMAGENET_PCA)])
def test_uint8_batches_normalized_on_the_device_equal_the_float_pipeline(jpegs, arch, size, pca):
    data, arch = image_folder(jpegs), ARCHS[arch]
    batches = list(
        train_batches(
            data, batch_size=4, image_size=size, seed=3, num_steps=3, arch=arch, colour_pca=pca, decode="exact"
        )
    )
    assert all(b["image"].dtype == np.uint8 for b in batches)
    for step, batch in enumerate(batches):
        expected = _float_batch(data, arch, size, 3, step, 4, pca)
        ours = np.asarray(jax.jit(model_inputs)(batch))
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)  # float32 rounding of values up to ~2.6
    evals = next(iter(eval_batches(data, batch_size=4, image_size=size, arch=arch, crops=10, decode="exact")))
    expected = np.stack([arch.eval_transform(Image.open(p), size, 10) for p, _ in data.samples[:4]])
    np.testing.assert_allclose(np.asarray(jax.jit(model_inputs)(evals)), expected, rtol=0, atol=2e-6)


def test_reduced_decoding_keeps_boxes_flips_and_labels_and_bounds_the_pixel_difference(jpegs):
    data = image_folder(jpegs)
    with open_image(data.samples[0][0]) as image:  # a 375x500 JPEG
        assert reduce_on_decode(image, 300, 300, 64, 64) == 0.25
        assert image.size == (94, 125)  # decoded at 1/4: what the reduced path resizes from
    with open_image(data.samples[0][0]) as image:
        assert reduce_on_decode(image, 100, 100, 64, 64) == 1.0  # 1/2 would leave the box under 64 pixels

    def batches(decode, **kw):
        return list(train_batches(data, batch_size=4, image_size=64, seed=0, num_steps=4, decode=decode, **kw))

    exact, reduced = batches("exact"), batches("reduced")
    differ = 0
    for a, b in zip(exact, reduced):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        diff = np.abs(a["image"].astype(np.int16) - b["image"].astype(np.int16))
        # Per image: a box or a flip that differed would move most pixels by tens of levels.
        assert diff.reshape(4, -1).mean(axis=1).max() < 2.0
        assert np.percentile(diff, 99) <= 12
        differ += int(diff.any())
    assert differ  # the reduced decode did run
    evals = [list(eval_batches(data, batch_size=8, image_size=64, decode=d))[0]["image"] for d in ("exact", "reduced")]
    assert np.abs(evals[0].astype(np.int16) - evals[1]).mean() < 2.0
    assert np.abs(evals[0].astype(np.int16) - evals[1]).any()


def test_a_pack_reads_back_as_the_same_batches_as_its_folder(jpegs, tmp_path, capsys):
    result = pack_folder(jpegs, tmp_path / "shards", shard_bytes=150_000)
    assert result.images == 8 and result.shards > 1 and result.skipped == 0
    folder, shards = image_folder(jpegs), open_data(tmp_path / "shards")
    assert shards.classes == folder.classes and len(shards) == len(folder)
    for decode in ("exact", "reduced"):
        kw = {"batch_size": 4, "image_size": 64, "seed": 5, "num_steps": 4, "decode": decode}
        for a, b in zip(train_batches(folder, **kw), train_batches(shards, **kw)):
            for key in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[key], b[key])
    kw = {"batch_size": 4, "image_size": 64, "seed": 5, "num_steps": 2}
    for a, b in zip(train_batches(shards, workers=1, **kw), train_batches(shards, **kw)):  # readers in a worker
        np.testing.assert_array_equal(a["image"], b["image"])
    with pytest.raises(DataError, match="classes differ from the training set's"):
        open_shards(tmp_path / "shards", classes=("cat", "cow"))


def test_pack_reencodes_and_a_damaged_record_is_skipped_and_counted(jpegs, tmp_path, capsys):
    source = tmp_path / "src"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        for path in sorted((jpegs / name).glob("*.jpg"))[:2]:
            (source / name / path.name).write_bytes(path.read_bytes())
    (source / "cat" / "notes.jpg").write_bytes(b"not an image")  # skipped at pack time
    broken = source / "dog" / "truncated.jpg"  # a readable header over missing data: found when decoded
    broken.write_bytes((jpegs / "dog").glob("*.jpg").__next__().read_bytes()[:2000])
    result = pack_folder(source, tmp_path / "small", max_side=100)
    assert result.skipped == 2 and result.images == 4
    assert "notes.jpg: not an image" in capsys.readouterr().err
    shards = open_shards(tmp_path / "small")
    sizes = {shards.open(i).size for i in range(len(shards))}
    assert {max(s) for s in sizes} == {100}
    square = pack_folder(source, tmp_path / "square", square=True)
    assert {open_shards(tmp_path / "square").open(i).size for i in range(square.images)} == {(256, 256)}
    assert square.skipped == 2
    plain = pack_folder(source, tmp_path / "plain", shard_bytes=10**9)  # the truncated file's bytes, as they are
    assert plain.skipped == 1  # only notes.jpg: the header of the truncated file reads
    batches = list(eval_batches(open_shards(tmp_path / "plain"), batch_size=5, image_size=64))
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert "record" in capsys.readouterr().err


def test_damaged_or_foreign_shard_files_are_one_line_errors_naming_them(jpegs, tmp_path, capsys):
    pack_folder(jpegs, tmp_path / "s")
    shard = next((tmp_path / "s").glob("*.array_record"))
    data = shard.read_bytes()
    # Damaged in place (size unchanged): Riegeli's chunk hashes find it; the record is skipped and counted.
    shard.write_bytes(data[:60_000] + b"\xff" * 100 + data[60_100:])
    batches = list(eval_batches(open_shards(tmp_path / "s"), batch_size=8, image_size=64))
    assert int(batches[0]["skipped"]) == 1 and batches[0]["mask"].sum() == 7
    assert "damaged shard record (Corrupted Riegeli" in capsys.readouterr().err
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{shard}: \d+ bytes where manifest.json says {len(data)}: truncated"):
        open_shards(tmp_path / "s")
    shard.write_bytes(b"\0" * len(data))  # same size, not a shard
    with pytest.raises(DataError, match=rf"{shard}: (not a readable ArrayRecord shard|0 records where)"):
        open_shards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="cannot be read as a shard manifest"):
        open_shards(tmp_path / "s")


def test_an_interrupted_pack_leaves_nothing_behind(jpegs, tmp_path, monkeypatch):
    import alexnet_jax.training.pack as pack

    calls = []

    def interrupt(self, path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, path)

    original = pack._Encoder.__call__
    monkeypatch.setattr(pack._Encoder, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pack_folder(jpegs, tmp_path / "out", shard_bytes=100_000)
    assert not (tmp_path / "out").exists()  # it made the folder, so it removes it, shards and all


def test_pack_command_and_training_flags_take_shards(jpegs, tmp_path, capsys):
    assert cli_run(["pack", str(jpegs), "--output", str(tmp_path / "p"), "--workers", "0", "--no-progress"]) == 0
    assert "packed 8 images into 1 shard(s)" in capsys.readouterr().out
    assert cli_run(["pack", str(jpegs), "--output", str(tmp_path / "p")]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_run(["pack", str(jpegs), "--output", str(tmp_path / "q"), "--arch", "2012", "--max-side", "300"])
    assert "--max-side does not apply" in capsys.readouterr().err


@pytest.mark.slow  # the fast loop keeps the batches' equality
def test_a_run_on_shards_ends_with_the_parameters_of_a_run_on_its_folders(tiny, colour_data, tmp_path):
    train, val = colour_data(8, 3)
    shards = (pack_folder(train, tmp_path / "train").output, pack_folder(val, tmp_path / "val").output)
    runs = [
        train_and_evaluate(tiny_config(data, decode="exact"), tmp_path / name)
        for name, data in (("folders", (train, val)), ("shards", shards))
    ]
    assert runs[0]["val_top1"] == runs[1]["val_top1"]
    params = [load_variables(run["final_variables"])["params"] for run in runs]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(a, b)


SCRIPT = """
import sys
from alexnet_jax.training.pipeline import image_folder, train_batches
batches = train_batches(image_folder(sys.argv[1]), batch_size=4, image_size=64, seed=0, num_steps=1, workers=2)
print(next(iter(batches))["image"].shape)
"""


@pytest.mark.slow
def test_workers_started_at_a_scripts_top_level_are_one_line_not_a_cascade(jpegs, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT)
    done = run_python([script, jpegs], env=pythonpath_with_tests(), timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1 and len(done.stderr.splitlines()) < 12
    assert f"{script}:4 starts data worker processes at the top level of the script" in done.stderr
    assert 'put that code under `if __name__ == "__main__":`' in done.stderr
    guarded = tmp_path / "guarded.py"
    body = "\n".join("    " + line for line in SCRIPT.strip().splitlines())
    guarded.write_text(f'if __name__ == "__main__":\n{body}\n')
    done = run_python([guarded, jpegs], env=pythonpath_with_tests(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(4, 64, 64, 3)" in done.stdout


@pytest.mark.slow
@pytest.mark.torch
def test_pipeline_benchmark_runs_and_reports_every_contender(tmp_path, torchvision):
    output = tmp_path / "pipeline.json"
    pipeline_benchmark = load_script(REPO / "benchmarks" / "pipeline.py")
    argv = ["--images", "24", "--batch-size", "8", "--size", "64", "--workers", "0", "--output", str(output)]
    assert pipeline_benchmark.main(argv) == 0
    results = json.loads(output.read_text())
    names = {row["pipeline"] for row in results["rows"]}
    assert "torchvision ImageFolder + DataLoader" in names and "train_batches, uint8, reduced" in names
    assert all(row["img_s"] > 0 for row in results["rows"]) and len(results["rows"]) == 6
    assert set(results["profile_ms_per_image"]) == {
        "open (header)",
        "decode",
        "crop + resize + flip",
        "normalize (float32)",
    }


def _tiny_cli(colour_data, tmp_path, *extra):
    from tiny_arch import train_flags

    config = tiny_config(colour_data(8, 3), epochs=1000, workers=1)
    return [TRAIN_TINY, *train_flags(config, tmp_path / "run"), *extra]


def _can_mount_a_private_tmpfs() -> str | None:
    # What keeps this test from mounting a small /dev/shm of its own, or None.
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs at /dev/shm in a private mount namespace"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return None if probe.returncode == 0 else "this machine refuses private mount namespaces (unshare -m)"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_dev_shm_too_small_for_the_workers_is_one_line_before_they_start(colour_data, tiny, tmp_path):
    reason = _can_mount_a_private_tmpfs()
    if reason:
        pytest.skip(reason)
    argv = " ".join(shlex.quote(str(a)) for a in [sys.executable, *_tiny_cli(colour_data, tmp_path)])
    # Batches of 8 at 64 px are 96 KB: one worker holds up to 4 of them at once, more than 256 KB.
    command = f"mount -t tmpfs -o size=256k tmpfs /dev/shm && exec {argv}"
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **pythonpath_with_tests()},
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "error: 1 data worker(s) need about 384 KB of shared memory for batches of 96 KB, and /dev/shm has 256 KB "
        "free: give it more room (Docker: --shm-size=2g; Kubernetes: an emptyDir volume with medium: Memory "
        "mounted at /dev/shm), or use a smaller --batch-size, fewer --workers, or --workers 0"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the run began


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_data_worker_that_dies_ends_the_run_in_one_line_naming_the_cause(colour_data, tiny, tmp_path):
    sig = "SIGBUS"  # what a full /dev/shm does to a worker; the other causes' lines: the test below
    run = subprocess.Popen(
        [sys.executable, *map(str, _tiny_cli(colour_data, tmp_path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **pythonpath_with_tests()},
    )
    try:
        worker = None
        for _ in range(300):  # the worker starts once the run has compiled its step
            worker = next((pid for pid in children(run.pid) if _is_grain_worker(pid)), None)
            if worker is not None or run.poll() is not None:
                break
            time.sleep(0.2)
        assert worker is not None, run.communicate(timeout=5)
        time.sleep(1.0)  # mid-run
        os.kill(worker, getattr(signal, sig))
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a data worker process died of SIGBUS: shared memory"), err


def test_grains_worker_errors_become_one_line_with_the_likely_cause():
    def line(code):
        return describe_worker_death(
            RuntimeError(f"Worker process was terminated unexpectedly with exit code {code}. ...")
        )

    assert line(-signal.SIGKILL).startswith("a data worker process was killed (SIGKILL), most often by the out-of")
    assert line(-signal.SIGSEGV) == "a data worker process died of SIGSEGV"
    assert line(3) == "a data worker process exited with status 3; its error is above"
    assert describe_worker_death(RuntimeError("something else")) is None


def _is_grain_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "spawn_main" in command and "resource_tracker" not in command
