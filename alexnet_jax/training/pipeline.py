"""ImageFolder input pipeline: torchvision's class rule, each architecture's transforms, Grain workers, exact resume.

Layout `root/<class>/<image>`; class indices come from the sorted class folder names,
as in `torchvision.datasets.ImageFolder`. The transforms are the architecture's
(`archs.ARCHS`, written in `alexnet_jax.transforms.augment`). For "torchvision", train images get
torchvision's reference augmentation (RandomResizedCrop(S, scale 0.08-1, ratio
3/4-4/3) + horizontal flip); eval images get `alexnet_jax.transforms.preprocess` (resize 256,
center crop 224), scaled for other sizes S to resize round(S * 256 / 224), crop S. For
"2012", the paper's: random S crops of the 256x256 image and their mirrors, plus
optional PCA colour noise; eval the centre crop. Eval batches can hold ten crops per
image (TenCrop's order) instead of one.

Determinism: the order of epoch e is a permutation drawn from (seed, e), and the
augmentation of the example at position i of the run (counted from step 0) from (seed, e, i). Batch t of a
run is therefore a function of (seed, t) alone: resuming at step t restores the data
position exactly, and the number of worker processes changes nothing.

A file that cannot be read becomes a zero image with mask 0 (no weight in the loss
or the metrics) and is counted in the batch's `skipped`; it never stops a run.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from alexnet_jax.archs import ARCHS, Arch
from alexnet_jax.training.shutdown import worker_init
from alexnet_jax.transforms.augment import (
    ColourPCA,
    colour_pca_from_moments,
    paper_square,
    pixel_moments,
)
from alexnet_jax.transforms.images import ImageReadError, load_image, walk_images
from alexnet_jax.upstream import unlink_shared_memory_now, wait_for_grain_unlinks

# Images the colour PCA of a folder is estimated from: 1000 x 65,536 pixels pin a 3x3
# covariance down far below the noise it scales (alpha's standard deviation is 0.1).
PCA_MAX_IMAGES = 1000
# Salts that keep the permutation, augmentation and PCA-sample streams apart.
_ORDER, _AUGMENT, _PCA = 0, 1, 2


class DataError(ValueError):
    """A data folder that cannot be used; the message is one line naming the folder."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The files of an ImageFolder tree: sorted class names and (path, class index) pairs in walk order."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.samples)


def image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolder:
    """Index `root/<class>/<image>` as torchvision's `ImageFolder` does.

    Class folders are the sub-folders of `root` (hidden ones left out), sorted by
    name; index i is the i-th name. Images are the files with a suffix Pillow reads,
    found recursively and sorted. `classes` (e.g. the training set's) makes a
    validation folder use the same indices; its folders must be those classes.
    **Raises:** DataError for a missing root, no class folders, class folders with
    no image, or class folders that differ from `classes`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class folders (expected the layout {root}/<class>/<image>)")
    if classes is not None and tuple(found) != tuple(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(
            f"{root}: class folders differ from the training set's (missing: {', '.join(missing) or '-'}; "
            f"not in training: {', '.join(extra) or '-'})"
        )
    samples, empty = [], []
    for index, name in enumerate(found):
        files = _image_files(root / name)
        if not files:
            empty.append(name)
        samples.extend((f, index) for f in files)
    if empty:
        raise DataError(f"{root}: no image files in class folder(s) {', '.join(empty)}")
    return ImageFolder(root, tuple(found), tuple(samples))


def _image_files(folder: Path) -> list[str]:
    walk = walk_images(folder)
    for problem in walk.problems:  # a training set that silently lost a folder would mislead
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    return [str(path) for path in walk.images]


def check_image_size(image_size: int, arch: Arch = ARCHS["torchvision"]) -> None:
    """**Raises:** DataError when the architecture `arch` cannot take `image_size` x `image_size` inputs."""
    if not isinstance(arch, Arch):  # a name, which it took before: say what replaced it
        raise TypeError(f"arch takes an Arch record (alexnet_jax.archs.get_arch({arch!r})), not a name")
    try:
        arch.check_image_size(image_size)
    except ValueError as e:
        raise DataError(str(e)) from None


def colour_pca_from_folder(
    folder: ImageFolder, *, max_images: int = PCA_MAX_IMAGES, seed: int = 0, progress: bool = False
) -> ColourPCA:
    """The paper's colour PCA of a training folder: eigenvalues and eigenvectors of the RGB covariance.

    Pixels are those of `paper_square` (the 256x256 images training crops from), on the
    [0, 1] scale; `max_images` images drawn without replacement by `seed` (all when the
    folder has fewer) estimate it. Unreadable files are skipped with a warning.
    **Raises:** DataError when no image could be read.
    """
    order = np.random.default_rng([seed, _PCA]).permutation(len(folder))[:max_images]
    paths = [folder.samples[i][0] for i in sorted(order)]
    images = (_read(p) for p in tqdm(paths, desc="colour PCA", unit="image", disable=not progress))
    count, total, outer = pixel_moments(paper_square(image) for image in images if image is not None)
    if count == 0:
        raise DataError(f"{folder.root}: no readable image to compute the colour PCA from")
    return colour_pca_from_moments(count, total, outer)


def _read(path: str) -> Image.Image | None:
    try:
        return load_image(path)
    except ImageReadError as e:
        print(f"warning: skipping {path}: {e}", file=sys.stderr, flush=True)
        return None


@dataclasses.dataclass(frozen=True)
class _BatchLoader:
    """Batch index -> batch dict. Picklable, so Grain can run it in worker processes.

    `transform` is an architecture's `train_transform(image, size, rng)` when `train`, else its
    `eval_transform(image, size, crops)`: module-level functions, which pickle by name (an
    `Arch` record holds lambdas, which do not).
    """

    samples: tuple[tuple[str, int], ...]
    image_size: int
    batch_size: int  # per process
    train: bool
    transform: Callable[..., np.ndarray]
    seed: int = 0
    steps_per_epoch: int = 0
    shard_index: int = 0
    shard_count: int = 1
    crops: int = 1  # eval only: 1 or 10 crops per image
    colour_pca: ColourPCA | None = None  # train only: the paper's colour noise, after the crop and flip

    def _positions(self, step: int) -> tuple[int, np.ndarray]:
        # (epoch, sample indices of this process's part of global batch `step`, -1 for padding).
        global_batch = self.batch_size * self.shard_count
        first = self.shard_index * self.batch_size
        if not self.train:
            idx = np.arange(step * global_batch + first, step * global_batch + first + self.batch_size)
            return 0, np.where(idx < len(self.samples), idx, -1)
        epoch, b = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.samples), self.seed, epoch)
        start = b * global_batch + first
        return epoch, order[start : start + self.batch_size]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, indices = self._positions(int(step))
        size = self.image_size
        crops = () if self.train or self.crops == 1 else (self.crops,)
        images = np.zeros((len(indices), *crops, size, size, 3), np.float32)
        labels = np.zeros(len(indices), np.int32)
        mask = np.zeros(len(indices), np.float32)
        skipped = 0
        first = int(step) * self.batch_size * self.shard_count + self.shard_index * self.batch_size
        for j, i in enumerate(indices):
            if i < 0:
                continue
            path, labels[j] = self.samples[i]
            image = _read(path)
            try:
                if image is None:
                    raise ImageReadError("unreadable")
                if self.train:
                    rng = np.random.default_rng([self.seed, _AUGMENT, epoch, first + j])
                    images[j] = self.transform(image, size, rng)
                    if self.colour_pca is not None:
                        images[j] = self.colour_pca.apply(images[j], rng)
                else:
                    images[j] = self.transform(image, size, self.crops)
            except (ImageReadError, OSError, ValueError) as e:
                # A decoded image that PIL cannot convert or resize (a truncated tail read
                # lazily, say) is skipped like an unreadable one; `_read` warned for those.
                if image is not None:
                    print(f"warning: skipping {path}: {e}", file=sys.stderr, flush=True)
                skipped += 1
                continue
            mask[j] = 1.0
        return {"image": images, "label": labels, "mask": mask, "skipped": np.int32(skipped)}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training examples in `epoch`: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, _ORDER, epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    """Full batches per epoch; the last partial batch is dropped so every step has the same shape."""
    return n // global_batch_size


def _iterate(loader: _BatchLoader, start: int, stop: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
    dataset = grain.MapDataset.range(start, stop).map(loader)
    if workers > 0:
        # Grain 0.2.18 reads an absl flag when it starts workers and fails in programs that
        # never parse absl flags (google/grain#1355); their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Each worker process builds whole batches; Grain hands them back in index order.
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
            # Workers end with their parent (a killed run's would hold memory for good) and only when
            # it says so (not at the Ctrl-C or SIGTERM that reaches every process of a job).
            worker_init_fn=functools.partial(worker_init, os.getpid()),
        )
    else:
        # Threads in this process: Pillow releases the GIL while it decodes and resizes.
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    iterator = iter(iterable)
    try:
        # map, not a loop variable: this generator holds no batch while the caller has it.
        yield from (map(_unlink_shared_memory, iterator) if workers > 0 else iterator)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        if workers > 0:
            # Batches Grain had taken from the workers but not handed over yet sit in reference
            # cycles of its iterators; collected now, their shared memory is unlinked. Collected
            # at exit instead, it would be left to Python's resource tracker, which warns.
            del iterator, iterable
            gc.collect()
            # Grain unlinks a collected batch's shared memory on a pool of one thread; a process
            # that exits right after a stop would leave those unlinks to the resource tracker,
            # which does them with a warning after the stop line.
            wait_for_grain_unlinks()


def _unlink_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A worker's batch arrives as arrays mapped from named shared memory (/dev/shm) that
    # Grain unlinks only when an array is collected, on its one-thread pool; Python's resource
    # tracker, which registered the name at the attach, unlinks it with a warning if the
    # process exits first, and a caller may hold the last batch past a stop. Unlinked here,
    # the name is gone at once and the mapping stays valid until the array is collected:
    # nothing is left for the tracker or in /dev/shm, however long the batch is kept.
    for array in batch.values():
        unlink_shared_memory_now(array)
    return batch


def train_batches(
    folder: ImageFolder,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int,
    workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    arch: Arch = ARCHS["torchvision"],
    colour_pca: ColourPCA | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Training batches for steps `start_step` .. `num_steps - 1`, across epochs.

    `batch_size` is the global batch; with `shard_count` processes, process
    `shard_index` gets its contiguous 1/shard_count part of every global batch (the
    hook for multi-host training). `workers` > 0 decodes in that many processes.
    `arch` (an `archs.ARCHS` record) gives the transforms; `colour_pca` adds its noise to every
    image (drawn after the crop and flip, from the same per-example generator).
    **Yields:** {"image": float32 (B, S, S, 3), "label": int32 (B,), "mask": float32
    (B,), "skipped": int32 ()} with B = batch_size // shard_count.
    """
    check_image_size(image_size, arch)
    if batch_size % shard_count:
        raise DataError(f"batch size {batch_size} does not split over {shard_count} processes")
    per_epoch = steps_per_epoch(len(folder), batch_size)
    if per_epoch == 0:
        raise DataError(f"{folder.root}: {len(folder)} images is less than one batch of {batch_size}")
    loader = _BatchLoader(
        folder.samples,
        image_size,
        batch_size // shard_count,
        True,
        arch.train_transform,
        seed,
        per_epoch,
        shard_index,
        shard_count,
        colour_pca=colour_pca,
    )
    return _iterate(loader, start_step, num_steps, workers)


def eval_batches(
    folder: ImageFolder,
    *,
    batch_size: int,
    image_size: int,
    workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    arch: Arch = ARCHS["torchvision"],
    crops: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every image of `folder` once, in folder order, with `arch`'s eval transform; the last batch is padded (mask 0).

    **Yields:** the same dicts as `train_batches`; with `crops=10` "image" is
    (B, 10, S, S, 3), TenCrop's crops of each image (`augment.ten_crop`).
    """
    check_image_size(image_size, arch)
    if batch_size % shard_count:
        raise DataError(f"batch size {batch_size} does not split over {shard_count} processes")
    loader = _BatchLoader(
        folder.samples,
        image_size,
        batch_size // shard_count,
        False,
        arch.eval_transform,
        shard_index=shard_index,
        shard_count=shard_count,
        crops=crops,
    )
    return _iterate(loader, 0, math.ceil(len(folder) / batch_size), workers)
