"""ImageFolder pipeline: torchvision's class rule and transforms, deterministic order, workers, bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray
from PIL import Image

from alexnet_jax import preprocess
from alexnet_jax.training.pipeline import DataError, eval_batches, image_folder, train_batches
from alexnet_jax.transforms.augment import eval_pixels, eval_transform, random_resized_crop_box, train_transform

from helpers import children, gone, shared_memory

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 5


def _write_folder(root, rng, sizes=((80, 60), (64, 96), (100, 100))):
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = sizes[(c + i) % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("data") / "train", np.random.default_rng(0))


@pytest.mark.torch
def test_classes_and_samples_match_torchvision_imagefolder(folder, torchvision):
    (folder / "ant" / "notes.txt").write_text("not an image")
    try:
        ours = image_folder(folder)
        theirs = torchvision.datasets.ImageFolder(str(folder))
    finally:
        (folder / "ant" / "notes.txt").unlink()
    assert ours.classes == tuple(theirs.classes) == CLASSES
    assert list(ours.samples) == [(p, i) for p, i in theirs.samples]
    assert len(ours) == len(CLASSES) * PER_CLASS


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "no such folder"),
        (lambda root: root.mkdir(), "no class folders"),
        (
            lambda root: (root / "a").mkdir(parents=True) or (root / "b").mkdir(),
            "no image files in class folder\\(s\\) a, b",
        ),
    ],
)
def test_unusable_folders_are_one_line_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        image_folder(root)


def test_validation_classes_must_match_training(folder):
    with pytest.raises(DataError, match="missing: dog; not in training: -"):
        image_folder(folder, classes=CLASSES + ("dog",))


@pytest.mark.torch
def test_eval_transform_is_preprocess_at_224_and_torchvision_scaled_at_64(torchvision, rng):
    import torch
    from torchvision import transforms as T

    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    np.testing.assert_array_equal(eval_transform(image, 224), preprocess(image))
    theirs = T.Compose(
        [T.Resize(73), T.CenterCrop(64), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )(image)
    np.testing.assert_array_equal(eval_transform(image, 64), theirs.permute(1, 2, 0).numpy())
    assert isinstance(theirs, torch.Tensor)


@pytest.mark.torch
def test_train_transform_is_torchvision_resized_crop_and_flip_on_the_same_box(torchvision, rng):
    from torchvision.transforms import functional as F

    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    flips = set()
    for seed in range(6):
        draw = np.random.default_rng(seed)
        left, top, w, h = random_resized_crop_box(*image.size, draw)
        flip = draw.uniform() < 0.5
        flips.add(flip)
        expected = F.resized_crop(image, top, left, h, w, [64, 64], antialias=True)
        expected = F.hflip(expected) if flip else expected
        expected = F.normalize(F.to_tensor(expected), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        got = train_transform(image, 64, np.random.default_rng(seed))
        np.testing.assert_allclose(got, expected.permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)
    assert flips == {True, False}


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    draw = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 80, draw)
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
        assert 0.08 * 9600 * 0.9 <= w * h <= 9600
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # A strip no box of ratio 3/4..4/3 fits in: torchvision's fallback, a centered crop at the ratio limit.
    assert random_resized_crop_box(400, 20, draw) == (186, 0, 27, 20)


def _batches(folder, **kw):
    defaults = dict(batch_size=4, image_size=64, seed=1, num_steps=6)
    return list(train_batches(image_folder(folder), **{**defaults, **kw}))


@pytest.mark.slow  # a Grain worker process: the fast loop reads in threads only
def test_order_is_fixed_by_seed_and_step_with_or_without_workers(folder):
    base = _batches(folder)
    assert len(base) == 6 and base[0]["image"].shape == (4, 64, 64, 3)
    with_workers = _batches(folder, workers=2)
    resumed = _batches(folder, start_step=4)
    other_seed = _batches(folder, seed=2)
    for a, b in zip(base, with_workers):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(base[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(base[0]["image"], other_seed[0]["image"])


@pytest.mark.slow
def test_a_batch_from_the_workers_leaves_no_shared_memory_name_however_long_it_is_kept(folder):
    """Its /dev/shm names go as it is handed over, so a batch kept past the close (the SIGTERM test's wrapper
    kept the last one) leaves Python's resource tracker nothing to warn about; it still reads the same."""
    batches = train_batches(image_folder(folder), batch_size=4, image_size=64, seed=1, num_steps=6, workers=1)
    kept = next(batches)
    batches.close()
    names = [array.shm.name for array in kept.values() if isinstance(array, SharedMemoryArray)]
    assert len(names) == 3 and not [name for name in names if os.path.exists(f"/dev/shm/{name}")], names
    expected = _batches(folder, num_steps=1)[0]
    for key in expected:
        np.testing.assert_array_equal(kept[key], expected[key])


def test_epochs_are_permutations_and_differ(folder):
    # 15 images, batch 4: 3 steps per epoch, 3 images dropped each epoch.
    batches = _batches(folder, batch_size=5, num_steps=6)
    epoch0 = np.concatenate([b["label"] for b in batches[:3]])
    epoch1 = np.concatenate([b["label"] for b in batches[3:]])
    assert sorted(epoch0) == sorted(epoch1) == sorted(np.repeat(np.arange(3), PER_CLASS))
    assert not np.array_equal(batches[0]["image"], batches[3]["image"])
    assert all(b["mask"].all() and b["skipped"] == 0 for b in batches)


def test_shards_are_the_parts_of_the_global_batch(folder):
    whole = _batches(folder, num_steps=2)
    parts = [_batches(folder, num_steps=2, shard_index=i, shard_count=2) for i in range(2)]
    for step in range(2):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]), whole[step]["image"]
        )


def test_corrupt_image_is_skipped_and_counted_not_fatal(tmp_path, capsys):
    root = _write_folder(tmp_path / "data", np.random.default_rng(1))
    (root / "bee" / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    batches = _batches(root, batch_size=15, num_steps=1)
    assert int(batches[0]["skipped"]) == 1
    assert batches[0]["mask"].sum() == 14
    assert not batches[0]["image"][batches[0]["mask"] == 0].any()
    err = capsys.readouterr().err
    assert f"skipping {root / 'bee' / '02.png'}: truncated or corrupt" in err or "skipping" in err and "02.png" in err
    evals = list(eval_batches(image_folder(root), batch_size=4, image_size=64))
    assert sum(int(b["skipped"]) for b in evals) == 1


def test_eval_batches_cover_every_image_once_in_order_and_pad(folder):
    data = image_folder(folder)
    batches = list(eval_batches(data, batch_size=4, image_size=64))
    assert len(batches) == 4
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.tolist() == [1.0] * 15 + [0.0]
    assert labels[:15].tolist() == [label for _, label in data.samples]
    first = eval_pixels(Image.open(data.samples[0][0]), 64)
    np.testing.assert_array_equal(batches[0]["image"][0], first)


def test_small_image_size_and_too_few_images_are_refused(folder):
    with pytest.raises(DataError, match=r"image-size must be at least 63 \(AlexNet's smallest input\), got"):
        _batches(folder, image_size=62)
    with pytest.raises(DataError, match="15 images is less than one batch of 16"):
        _batches(folder, batch_size=16)


def test_a_link_loop_in_a_class_folder_is_walked_once_and_reported(tmp_path, capsys):
    # Reported by a user: a link back to its own class folder turned 64 images into 28,864 samples.
    root = _write_folder(tmp_path / "train", np.random.default_rng(1))
    (root / "bee" / "again").symlink_to(root / "bee")
    data = image_folder(root)
    assert len(data) == len(CLASSES) * PER_CLASS
    assert [label for _, label in data.samples] == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root / 'bee' / 'again'}: a link back to" in err


@pytest.mark.parametrize("target", ["..", "../ant", "../../elsewhere"], ids=["root", "sibling", "outside"])
def test_a_link_to_an_indexed_folder_never_changes_labels(tmp_path, capsys, target):
    root = _write_folder(tmp_path / "train", np.random.default_rng(1))
    _write_folder(tmp_path / "elsewhere", np.random.default_rng(2))  # a folder outside the data set: followed
    (root / "bee" / "link").symlink_to(target)
    (root / "ant" / "to_bee").symlink_to("../bee")  # and one walked before its target class
    data = image_folder(root)
    by_path = {}
    for path, label in data.samples:
        resolved = Path(path).resolve()
        assert by_path.setdefault(resolved, label) == label, path  # no image under two labels
    own = [(label, Path(path).relative_to(root).parts[0]) for path, label in data.samples]
    assert all(CLASSES[label] == folder for label, folder in own)  # each image under its own folder's label
    err = capsys.readouterr().err.splitlines()
    assert f"warning: {root / 'ant' / 'to_bee'}: a link to {root / 'bee'}, whose images are indexed already" in err[0]
    if target == "../../elsewhere":
        assert len(err) == 1 and len(data) == len(CLASSES) * PER_CLASS * 2  # its images are bee's: one label
    else:
        assert len(err) == 2 and f"{root / 'bee' / 'link'}: a link" in err[1] and len(data) == len(CLASSES) * PER_CLASS


_WORKER_CHILD = """
import sys, time
from alexnet_jax.training.pipeline import image_folder, train_batches
batches = train_batches(image_folder(sys.argv[1]), batch_size=2, image_size=64, seed=0, num_steps=10_000, workers=1)
next(batches)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_sigkilled_run_leaves_no_worker_and_no_shared_memory(folder):
    """SIGKILL cannot be caught: the worker notices its parent is gone and ends; Python's resource tracker
    then unlinks the shared memory and semaphores (before: worker and 43 /dev/shm entries left for good)."""
    run = subprocess.Popen([sys.executable, "-c", _WORKER_CHILD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "ready\n"
        spawned = children(run.pid)  # the Grain worker and the resource tracker
        held = shared_memory([run.pid, *spawned])
        assert len(spawned) == 2 and held, (spawned, held)
    finally:
        run.kill()
        run.wait()
    assert gone(spawned, within_s=10), spawned
    assert not {name for name in held if os.path.exists(f"/dev/shm/{name}")}
