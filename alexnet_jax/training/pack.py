"""`pack`: an ImageFolder written once into ArrayRecord shards, for data sets too large to read as loose files.

    result = pack_folder("train/", "train-shards/", max_side=512, workers=8, progress=True)
    data = open_data("train-shards/")                  # what `--data train-shards/` reads

Each image is stored as the bytes of its file, or re-encoded once as JPEG: at a maximum side
(`max_side`, as FFCV stores ImageNet) or as the 2012 paper's 256x256 images (`square=True`:
shorter side to 256, the central 256x256), so training decodes less. Images keep the
ImageFolder's order and labels, so a run on the shards reads the same batches as a run on the
folder (bit for bit when nothing is re-encoded). The record and manifest formats are in
`alexnet_jax.training.sources`.

Shards are written under a temporary name and renamed when complete; the manifest, which
makes the folder a data set, is written last. An interrupted or failed pack removes what it
wrote, so no half-written shard is ever read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.training.pipeline import check_workers_can_start
from alexnet_jax.training.sources import (
    SHARDS_FORMAT,
    SHARDS_MANIFEST,
    SHARDS_VERSION,
    DataError,
    encode_record,
    image_folder,
)
from alexnet_jax.transforms.augment import paper_square_pixels, resize_region
from alexnet_jax.transforms.images import ImageReadError, open_image
from alexnet_jax.transforms.preprocess import to_model_mode, to_uint8_rgb

SHARD_BYTES = 256 * 2**20  # a shard is closed once it holds this much: few files, and each one quick to copy
JPEG_QUALITY = 90
SHARD_NAME = "data-{:05d}.array_record"
# Grain reads records one at a time: one record per group keeps each read to one record.
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class PackResult:
    output: Path
    images: int  # records written
    skipped: int  # source files that could not be read
    shards: int
    bytes: int  # of the shards


def pack_folder(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_side: int | None = None,
    square: bool = False,
    quality: int = JPEG_QUALITY,
    shard_bytes: int = SHARD_BYTES,
    workers: int = 0,
    progress: bool = False,
) -> PackResult:
    """Write the ImageFolder `source` into ArrayRecord shards in `output` (a new or empty folder).

    `max_side` re-encodes images whose longer side is larger to that side (aspect kept; smaller
    ones are stored as they are); `square` re-encodes every image as the paper's 256x256 one.
    Re-encoding is JPEG at `quality`, from a reduced decode where the size allows it. `workers`
    > 0 reads and encodes in that many processes. A file that cannot be read is skipped with a
    warning and counted, as training skips one.
    **Raises:** DataError (a source that is not an ImageFolder, an `output` that holds files,
    no readable image), ValueError (options); whatever stopped the writing, after removing what
    this call wrote (KeyboardInterrupt included).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max-side must be at least 1, got {max_side}")
    if max_side is not None and square:
        raise ValueError("choose one of max-side and the 2012 square images, not both")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1 to 100, got {quality}")
    folder = image_folder(source)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output}: already exists and is not an empty folder; pack into a new folder")
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(output, shard_bytes)
    skipped, root = 0, folder.root
    encode = _Encoder(max_side, square, quality)
    try:
        items = _encoded(encode, [path for path, _ in folder.samples], workers)
        for (path, label), (data, problem) in tqdm(
            zip(folder.samples, items), total=len(folder), unit="image", desc="pack", disable=not progress
        ):
            if data is None:
                print(f"warning: skipping {path}: {problem}", file=sys.stderr, flush=True)
                skipped += 1
                continue
            writer.write(encode_record(data, label, str(Path(path).relative_to(root))), label)
        writer.close()
        if not writer.shards:
            raise DataError(f"{root}: no readable image to pack")
        manifest = {
            "format": SHARDS_FORMAT,
            "version": SHARDS_VERSION,
            "classes": list(folder.classes),
            "source": str(root.absolute()),
            "images": sum(len(s["labels"]) for s in writer.shards),
            "skipped": skipped,
            "encoding": {"max_side": max_side, "square": square, "quality": quality},
            "shards": writer.shards,
        }
        atomic_write_bytes(output / SHARDS_MANIFEST, (json.dumps(manifest) + "\n").encode())
    except BaseException:
        writer.remove()
        if created and not any(output.iterdir()):
            output.rmdir()
        raise
    return PackResult(output, manifest["images"], skipped, len(writer.shards), sum(s["bytes"] for s in writer.shards))


@dataclasses.dataclass(frozen=True)
class _Encoder:
    """One source file -> (the bytes to store, None) or (None, why not). Picklable for worker processes."""

    max_side: int | None
    square: bool
    quality: int

    def __call__(self, path: str) -> tuple[bytes | None, str | None]:
        try:
            with open_image(path) as image:
                if self.square:
                    return self._jpeg(Image.fromarray(paper_square_pixels(image, "reduced"))), None
                if self.max_side is not None and max(image.size) > self.max_side:
                    return self._jpeg(self._shrunk(image)), None
            # Stored as they are, the header read: a file damaged further in is found when training
            # decodes it, and skipped and counted there as a loose file is (decoding every image
            # here would double the cost of a pack).
            return Path(path).read_bytes(), None
        except (ImageReadError, OSError, ValueError) as e:
            return None, str(e)

    def _shrunk(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return resize_region(image, size, (0, 0, w, h), "reduced")

    def _jpeg(self, image: Image.Image) -> bytes:
        # JPEG holds 8-bit RGB or grey: other modes go through the pipeline's own uint8 rule.
        if image.mode not in ("RGB", "L"):
            image = Image.fromarray(to_uint8_rgb(np.asarray(to_model_mode(image))))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=self.quality)
        return out.getvalue()


def _encoded(encode: _Encoder, paths: list[str], workers: int) -> Iterator[tuple[bytes | None, str | None]]:
    if workers <= 0:
        yield from map(encode, paths)
        return
    check_workers_can_start()
    # Spawned, not forked: the parent may hold threads (JAX's, Grain's) that a fork would copy broken.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            yield from pool.map(encode, paths, chunksize=16)
        finally:
            pool.shutdown(cancel_futures=True)


class _ShardWriter:
    """Records into shards of about `shard_bytes`, each written as `<name>.tmp` and renamed when closed."""

    def __init__(self, output: Path, shard_bytes: int):
        self.output, self.shard_bytes = output, shard_bytes
        self.shards: list[dict[str, Any]] = []  # the manifest's entries of closed shards
        self._writer, self._labels, self._bytes = None, [], 0

    def _tmp(self) -> Path:
        return self.output / (SHARD_NAME.format(len(self.shards)) + ".tmp")

    def write(self, record: bytes, label: int) -> None:
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._writer = ArrayRecordWriter(str(self._tmp()), WRITER_OPTIONS)
        self._writer.write(record)
        self._labels.append(label)
        self._bytes += len(record)
        if self._bytes >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        """Finish the open shard, if any: close it and give it its name."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        tmp = self._tmp()
        final = tmp.with_suffix("")  # drops ".tmp"
        os.replace(tmp, final)
        self.shards.append({"file": final.name, "bytes": final.stat().st_size, "labels": self._labels})
        self._labels, self._bytes = [], 0

    def remove(self) -> None:
        """Delete every shard this writer wrote, the open one included."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - a writer that failed (a full disk) may fail again closing
                pass
            self._writer = None
        self._tmp().unlink(missing_ok=True)
        for shard in self.shards:
            (self.output / shard["file"]).unlink(missing_ok=True)
        self.shards = []
