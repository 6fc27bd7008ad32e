"""The input pipeline: images of a folder or of packed shards, each architecture's transforms, Grain workers,
uint8 batches, exact resume.

The images come from `alexnet_jax.training.sources` (an ImageFolder tree, class indices from
the sorted folder names as in `torchvision.datasets.ImageFolder`, or `pack`'s shards). The
transforms are the architecture's (`archs.ARCHS`, written in `alexnet_jax.transforms.augment`).
For "torchvision", train images get torchvision's reference augmentation (RandomResizedCrop(S,
scale 0.08-1, ratio 3/4-4/3) + horizontal flip); eval images get `preprocess`'s resize 256 and
centre crop 224, scaled for other sizes S to resize round(S * 256 / 224), crop S. For "2012",
the paper's: random S crops of the 256x256 image and their mirrors, plus optional PCA colour
noise; eval the centre crop. Eval batches can hold ten crops per image (TenCrop's order).

Batches hold uint8 pixels, a quarter of float32's bytes through shared memory and onto the
device; the steps normalize them there (`steps.model_inputs`), and add the colour noise the
pipeline drew per image. With `decode="reduced"` (the default) a JPEG is decoded at 1/2, 1/4 or
1/8 scale when the crop still has the output's pixels there (`augment.DECODE_MODES`).

Determinism: the order of epoch e is a permutation drawn from (seed, e), and the
augmentation of the example at position i of the run (counted from step 0) from (seed, e, i). Batch t of a
run is therefore a function of (seed, t) alone: resuming at step t restores the data
position exactly, and the number of worker processes changes nothing.

A file that cannot be read becomes a zero image with mask 0 (no weight in the loss
or the metrics) and is counted in the batch's `skipped`; it never stops a run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import grain
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from alexnet_jax.archs import ARCHS, Arch
from alexnet_jax.training.shutdown import worker_init
from alexnet_jax.training.sources import DataError, ImageFolder, ShardSet
from alexnet_jax.training.sources import image_folder as image_folder  # where it lived before sources.py
from alexnet_jax.transforms.augment import (
    ColourPCA,
    check_decode,
    colour_pca_from_moments,
    paper_square,
    pixel_moments,
)
from alexnet_jax.transforms.images import ImageReadError, decode
from alexnet_jax.upstream import unlink_shared_memory_now, wait_for_grain_unlinks

# Images the colour PCA of a folder is estimated from: 1000 x 65,536 pixels pin a 3x3
# covariance down far below the noise it scales (alpha's standard deviation is 0.1).
PCA_MAX_IMAGES = 1000
# Salts that keep the permutation, augmentation and PCA-sample streams apart.
_ORDER, _AUGMENT, _PCA = 0, 1, 2


def check_image_size(image_size: int, arch: Arch = ARCHS["torchvision"]) -> None:
    """**Raises:** DataError when the architecture `arch` cannot take `image_size` x `image_size` inputs."""
    if not isinstance(arch, Arch):  # a name, which it took before: say what replaced it
        raise TypeError(f"arch takes an Arch record (alexnet_jax.archs.get_arch({arch!r})), not a name")
    try:
        arch.check_image_size(image_size)
    except ValueError as e:
        raise DataError(str(e)) from None


def colour_pca_from_folder(
    folder: ImageFolder | ShardSet, *, max_images: int = PCA_MAX_IMAGES, seed: int = 0, progress: bool = False
) -> ColourPCA:
    """The paper's colour PCA of a training set (folder or shards): eigenvalues and eigenvectors of the RGB covariance.

    Pixels are those of `paper_square` (the 256x256 images training crops from), on the
    [0, 1] scale; `max_images` images drawn without replacement by `seed` (all when the
    set has fewer) estimate it. Unreadable images are skipped with a warning.
    **Raises:** DataError when no image could be read.
    """
    order = np.random.default_rng([seed, _PCA]).permutation(len(folder))[:max_images]
    indices = tqdm(sorted(order), desc="colour PCA", unit="image", disable=not progress)
    images = (_read(folder, int(i)) for i in indices)
    count, total, outer = pixel_moments(paper_square(image) for image in images if image is not None)
    if count == 0:
        raise DataError(f"{folder.root}: no readable image to compute the colour PCA from")
    return colour_pca_from_moments(count, total, outer)


def _read(source: ImageFolder | ShardSet, index: int) -> Image.Image | None:
    # Image `index` decoded whole, or None after a warning.
    try:
        with source.open(index) as image:
            return decode(image)
    except ImageReadError as e:
        print(f"warning: skipping {source.name(index)}: {e}", file=sys.stderr, flush=True)
        return None


@dataclasses.dataclass(frozen=True)
class _BatchLoader:
    """Batch index -> batch dict. Picklable, so Grain can run it in worker processes.

    `transform` is an architecture's `train_pixels(image, size, rng, decode)` when `train`, else
    its `eval_pixels(image, size, crops, decode)`: module-level functions, which pickle by name
    (an `Arch` record holds lambdas, which do not).
    """

    source: ImageFolder | ShardSet
    image_size: int
    batch_size: int  # per process
    train: bool
    transform: Callable[..., np.ndarray]
    seed: int = 0
    steps_per_epoch: int = 0
    shard_index: int = 0
    shard_count: int = 1
    crops: int = 1  # eval only: 1 or 10 crops per image
    colour_pca: ColourPCA | None = None  # train only: the paper's colour noise, drawn after the crop and flip
    decode: str = "reduced"  # `augment.DECODE_MODES`
    epoch_base: tuple[int, int] = (0, 0)  # train only: (step, epoch) where this data began

    def _positions(self, step: int) -> tuple[int, np.ndarray]:
        # (epoch, sample indices of this process's part of global batch `step`, -1 for padding).
        global_batch = self.batch_size * self.shard_count
        first = self.shard_index * self.batch_size
        if not self.train:
            idx = np.arange(step * global_batch + first, step * global_batch + first + self.batch_size)
            return 0, np.where(idx < len(self.source), idx, -1)
        base_step, base_epoch = self.epoch_base
        epoch, b = divmod(step - base_step, self.steps_per_epoch)
        epoch += base_epoch
        order = epoch_order(len(self.source), self.seed, epoch)
        start = b * global_batch + first
        return epoch, order[start : start + self.batch_size]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, indices = self._positions(int(step))
        size = self.image_size
        crops = () if self.train or self.crops == 1 else (self.crops,)
        batch = {
            "image": np.zeros((len(indices), *crops, size, size, 3), np.uint8),
            "label": np.zeros(len(indices), np.int32),
            "mask": np.zeros(len(indices), np.float32),
        }
        if self.colour_pca is not None:
            batch["colour"] = np.zeros((len(indices), 3), np.float32)
        skipped = 0
        first = int(step) * self.batch_size * self.shard_count + self.shard_index * self.batch_size
        for j, i in enumerate(indices):
            if i < 0:
                continue
            batch["label"][j] = self.source.label(i)
            try:
                with self.source.open(i) as image:
                    if self.train:
                        rng = example_rng(self.seed, epoch, first + j)
                        batch["image"][j] = self.transform(image, size, rng, self.decode)
                        if self.colour_pca is not None:
                            batch["colour"][j] = self.colour_pca.offset(rng)
                    else:
                        batch["image"][j] = self.transform(image, size, self.crops, self.decode)
            except (ImageReadError, OSError, ValueError) as e:
                # A decoded image that PIL cannot convert or resize is skipped like an unreadable one.
                print(f"warning: skipping {self.source.name(i)}: {e}", file=sys.stderr, flush=True)
                skipped += 1
                continue
            batch["mask"][j] = 1.0
        return {**batch, "skipped": np.int32(skipped)}


class WorkerStartError(RuntimeError):
    """Worker processes that would start by running the calling script again; the message says what to add."""


def check_workers_can_start() -> None:
    """Refuse, in one line, worker processes started from a script's top level outside `if __name__ == "__main__":`.

    Grain starts its workers by spawning: each runs the main script again before it works, so
    a script that starts workers at its top level would start them again in every worker,
    which ends in a cascade of tracebacks. The script's own source says whether the call is
    guarded: the top-level lines of the main module on the stack must all lie in an
    `if __name__ == "__main__":` block. Interactive sessions, `python -c` and packages'
    `__main__` modules (which multiprocessing does not run again) pass.
    **Raises:** WorkerStartError naming the script's line.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if path is None or spec == "__main__" or spec.endswith(".__main__"):
        return
    lines = [
        frame.f_lineno
        for frame, _ in traceback.walk_stack(None)
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"
    ]
    if not lines:
        return
    try:
        tree = ast.parse(Path(path).read_text(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return  # a script without readable source (a zip app, say): nothing to check against
    guarded = [range(node.lineno, node.end_lineno + 1) for node in tree.body if _is_main_guard(node)]
    for line in lines:
        if not any(line in block for block in guarded):
            raise WorkerStartError(
                f"{path}:{line} starts data worker processes at the top level of the script; workers start by "
                'running the script again, so put that code under `if __name__ == "__main__":` (or pass workers=0)'
            )


def _is_main_guard(node: ast.stmt) -> bool:
    # `if __name__ == "__main__":`, either way round.
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1):
        return False
    sides = [node.test.left, node.test.comparators[0]]
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    constants = {s.value for s in sides if isinstance(s, ast.Constant)}
    return isinstance(node.test.ops[0], ast.Eq) and names == {"__name__"} and constants == {"__main__"}


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of the augmentation (crop, flip, colour noise) of the example at `position` of the run
    (counted from step 0 over the global batches), in `epoch`."""
    return np.random.default_rng([seed, _AUGMENT, epoch, position])


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training examples in `epoch`: a permutation drawn from (seed, epoch). Read-only.

    Kept for the epoch (and the one before, for a batch at the boundary): every batch of the epoch
    slices it, and drawing a permutation of ImageNet's 1.28M images anew for each batch would cost
    a worker about as much as decoding a few images.
    """
    order = np.random.default_rng([seed, _ORDER, epoch]).permutation(n)
    order.setflags(write=False)
    return order


def steps_per_epoch(n: int, global_batch_size: int) -> int:
    """Full batches per epoch; the last partial batch is dropped so every step has the same shape."""
    return n // global_batch_size


# Grain's buffer of finished batches per worker process (`MultiprocessingOptions`).
PER_WORKER_BUFFER = 2
SHARED_MEMORY = "/dev/shm"
# What to do when /dev/shm is too small, in the words of the places it is set.
_SHM_ADVICE = (
    "give it more room (Docker: --shm-size=2g; Kubernetes: an emptyDir volume with medium: Memory mounted at "
    "/dev/shm), or use a smaller --batch-size, fewer --workers, or --workers 0"
)


def shared_memory_needed(batch_bytes: int, workers: int) -> int:
    """Bytes of /dev/shm `workers` processes can hold at once: each its buffer of batches plus the one it is
    building, and the one the training loop holds."""
    return (workers * (PER_WORKER_BUFFER + 1) + 1) * batch_bytes


def check_shared_memory(batch_bytes: int, workers: int, folder: str = SHARED_MEMORY) -> None:
    """Refuse in one line to start workers whose batches would not fit in `folder`'s free space.

    Containers give /dev/shm 64 MB by default (Docker, Kubernetes); a worker that runs out of
    it dies of SIGBUS halfway through a batch. Checked before any worker starts, so the run
    ends before it began, with what to change.
    **Raises:** DataError.
    """
    try:
        info = os.statvfs(folder)
    except OSError:
        return  # no /dev/shm (not Linux): Python's shared memory lives elsewhere
    free, needed = info.f_bavail * info.f_frsize, shared_memory_needed(batch_bytes, workers)
    if needed > free:
        raise DataError(
            f"{workers} data worker(s) need about {_size(needed)} of shared memory for batches of "
            f"{_size(batch_bytes)}, and {folder} has {_size(free)} free: {_SHM_ADVICE}"
        )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def describe_worker_death(error: BaseException) -> str | None:
    """Grain's "Worker process was terminated unexpectedly with exit code N" as one line with the likely cause;
    None for another error."""
    match = re.search(r"terminated unexpectedly with exit code (-?\d+)", str(error))
    if match is None:
        return None
    code = int(match.group(1))
    if code == -signal.SIGBUS:
        return f"a data worker process died of SIGBUS: shared memory ({SHARED_MEMORY}) ran out; {_SHM_ADVICE}"
    if code == -signal.SIGKILL:
        return (
            "a data worker process was killed (SIGKILL), most often by the out-of-memory killer: use fewer "
            "--workers or a smaller --batch-size, or give the job more memory"
        )
    if code < 0:
        return f"a data worker process died of {signal.Signals(-code).name}"
    return f"a data worker process exited with status {code}; its error is above"


def _iterate(loader: _BatchLoader, start: int, stop: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
    dataset = grain.MapDataset.range(start, stop).map(loader)
    if workers > 0:
        # Grain 0.2.18 reads an absl flag when it starts workers and fails in programs that
        # never parse absl flags (google/grain#1355); their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Each worker process builds whole batches; Grain hands them back in index order.
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=PER_WORKER_BUFFER),
            # Workers end with their parent (a killed run's would hold memory for good) and only when
            # it says so (not at the Ctrl-C or SIGTERM that reaches every process of a job).
            worker_init_fn=functools.partial(worker_init, os.getpid()),
        )
    else:
        # Threads in this process: Pillow releases the GIL while it decodes and resizes.
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    iterator = iter(iterable)
    died = None
    try:
        # map, not a loop variable: this generator holds no batch while the caller has it.
        yield from (map(_unlink_shared_memory, iterator) if workers > 0 else iterator)
    except RuntimeError as e:
        died = describe_worker_death(e)
        if died is None:
            raise
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
    if died is not None:
        # Raised here, outside the handler: Grain's error and the batches its frames hold are
        # collected by now, not at exit, where their clean-up would print tracebacks.
        raise DataError(died)


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
    folder: ImageFolder | ShardSet,
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
    decode: str = "reduced",
    epoch_base: tuple[int, int] = (0, 0),
) -> Iterator[dict[str, np.ndarray]]:
    """Training batches for steps `start_step` .. `num_steps - 1`, across epochs, as uint8 pixels.

    `batch_size` is the global batch; with `shard_count` processes, process
    `shard_index` gets its contiguous 1/shard_count part of every global batch (the
    hook for multi-host training). `workers` > 0 decodes in that many processes.
    `arch` (an `archs.ARCHS` record) gives the transforms; `colour_pca` draws its noise for
    every image (after the crop and flip, from the same per-example generator); `decode`
    ("reduced" or "exact", `augment.DECODE_MODES`) says whether JPEGs may be decoded at a
    reduced scale where the crop allows it. `epoch_base` (step, epoch) says where this data set
    began in the run, when a resumed run was allowed to go on with changed data; step t is then
    in epoch `epoch + (t - step) // steps per epoch`.
    The steps (`steps.train_step`, the parallel ones) normalize the pixels and add the noise
    on the device (`steps.model_inputs`).
    **Yields:** {"image": uint8 (B, S, S, 3), "label": int32 (B,), "mask": float32 (B,),
    "skipped": int32 ()} with B = batch_size // shard_count, plus "colour": float32 (B, 3)
    (the noise on the normalized scale) with `colour_pca`.
    """
    _check_batches(image_size, arch, batch_size, shard_count, decode, workers)
    per_epoch = steps_per_epoch(len(folder), batch_size)
    if per_epoch == 0:
        raise DataError(f"{folder.root}: {len(folder)} images is less than one batch of {batch_size}")
    loader = _BatchLoader(
        folder,
        image_size,
        batch_size // shard_count,
        True,
        arch.train_pixels,
        seed,
        per_epoch,
        shard_index,
        shard_count,
        colour_pca=colour_pca,
        decode=decode,
        epoch_base=tuple(epoch_base),
    )
    return _iterate(loader, start_step, num_steps, workers)


def eval_batches(
    folder: ImageFolder | ShardSet,
    *,
    batch_size: int,
    image_size: int,
    workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    arch: Arch = ARCHS["torchvision"],
    crops: int = 1,
    decode: str = "reduced",
) -> Iterator[dict[str, np.ndarray]]:
    """Every image of `folder` once, in order, with `arch`'s eval crops as uint8; the last batch is padded (mask 0).

    **Yields:** the same dicts as `train_batches` (without "colour"); with `crops=10` "image" is
    (B, 10, S, S, 3), TenCrop's crops of each image (`augment.ten_crop`).
    """
    _check_batches(image_size, arch, batch_size, shard_count, decode, workers, crops)
    loader = _BatchLoader(
        folder,
        image_size,
        batch_size // shard_count,
        False,
        arch.eval_pixels,
        shard_index=shard_index,
        shard_count=shard_count,
        crops=crops,
        decode=decode,
    )
    return _iterate(loader, 0, math.ceil(len(folder) / batch_size), workers)


def _check_batches(
    image_size: int, arch: Arch, batch_size: int, shard_count: int, decode: str, workers: int, crops: int = 1
) -> None:
    check_image_size(image_size, arch)
    check_decode(decode)
    if batch_size % shard_count:
        raise DataError(f"batch size {batch_size} does not split over {shard_count} processes")
    if workers > 0:
        check_workers_can_start()
        check_shared_memory(batch_size // shard_count * crops * image_size * image_size * 3, workers)
