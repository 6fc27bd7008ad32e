"""Where training images come from: an ImageFolder tree, or the ArrayRecord shards `alexnet-jax pack` writes.

    data = open_data("train/")                          # a folder, or a folder of shards
    val = open_data("val/", classes=data.classes)       # the training set's class indices
    len(data), data.classes, data.label(i)
    with data.open(i) as image: ...                     # a PIL image, header read, not decoded

Both kinds give images by index with their labels, so the input pipeline treats them alike:
the batch order, the resume position and the split over processes do not depend on which one
is read. A folder follows torchvision's `ImageFolder` (class indices from the sorted folder
names). Shards hold each image's encoded bytes as they are in the file (or re-encoded once by
`pack`), so decoding and the crop's reduced decode work on them as on files.

Shard layout (`SHARDS_MANIFEST` names the set; a folder without it is an ImageFolder):

    DIR/manifest.json                      format, version, classes, each shard's records and bytes
    DIR/data-00000-of-00004.array_record   records: msgpack {"image": bytes, "label": int, "path": str}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
from PIL import Image

from alexnet_jax.transforms.images import ImageReadError, folder_identity, open_image, walk_images

SHARDS_MANIFEST = "manifest.json"
SHARDS_FORMAT = "alexnet-jax image shards"
SHARDS_VERSION = 1


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

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def name(self, index: int) -> str:
        """What a warning about image `index` names: its path."""
        return self.samples[index][0]

    def open(self, index: int) -> Image.Image:
        """Image `index`, header read (`images.open_image`). **Raises:** ImageReadError."""
        return open_image(self.samples[index][0])


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
    _check_classes(root, found, classes)
    samples, empty = [], []
    # Every class folder and the root count as indexed from the start: a link from one class into
    # another, or up to the root, would index images again under a second label.
    indexed = {folder_identity(root), *(folder_identity(root / name) for name in found)}
    for index, name in enumerate(found):
        files = _image_files(root / name, indexed)
        if not files:
            empty.append(name)
        samples.extend((f, index) for f in files)
    if empty:
        raise DataError(f"{root}: no image files in class folder(s) {', '.join(empty)}")
    return ImageFolder(root, tuple(found), tuple(samples))


def _check_classes(root: Path, found: Sequence[str], classes: Sequence[str] | None) -> None:
    if classes is not None and tuple(found) != tuple(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(
            f"{root}: classes differ from the training set's (missing: {', '.join(missing) or '-'}; "
            f"not in training: {', '.join(extra) or '-'})"
        )


def _image_files(folder: Path, indexed: set[tuple[int, int]]) -> list[str]:
    walk = walk_images(folder, indexed=indexed)
    for problem in walk.problems:  # a training set that silently lost a folder would mislead
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    return [str(path) for path in walk.images]


def decode_record(record: bytes) -> dict[str, Any]:
    """One shard record as {"image": bytes, "label": int, "path": str}. **Raises:** ValueError for other bytes."""
    try:
        item = msgpack.unpackb(record, raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on foreign bytes
        raise ValueError(f"not a record of this format ({type(e).__name__})") from None
    if not (isinstance(item, dict) and isinstance(item.get("image"), bytes) and isinstance(item.get("label"), int)):
        raise ValueError("not a record of this format (expected image bytes and a label)")
    return item


def encode_record(image: bytes, label: int, path: str) -> bytes:
    """The record `decode_record` reads."""
    return msgpack.packb({"image": image, "label": label, "path": path}, use_bin_type=True)


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The images of the ArrayRecord shards in a folder `pack` wrote, in pack order.

    Picklable: each worker process opens its own readers (Grain's `ArrayRecordDataSource`)
    at its first read.
    """

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]  # per image, from the manifest: the epoch order needs no record
    _source: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, index: int) -> int:
        return self.labels[index]

    def name(self, index: int) -> str:
        """What a warning about image `index` names: the shard folder, the record and its source path."""
        try:
            return f"{self.root} record {index} ({self.record(index)['path']})"
        except ImageReadError:
            return f"{self.root} record {index}"

    def record(self, index: int) -> dict[str, Any]:
        """Record `index` decoded. **Raises:** ImageReadError for a damaged record."""
        try:
            return decode_record(self._reader()[index])
        except (RuntimeError, ValueError) as e:  # Riegeli's checksums catch bytes damaged on disk
            raise ImageReadError(f"damaged shard record ({str(e).splitlines()[0][:200]})") from None

    def open(self, index: int) -> Image.Image:
        """Image `index`, header read. **Raises:** ImageReadError for a damaged record or image."""
        return open_image(io.BytesIO(self.record(index)["image"]))

    def _reader(self):
        if self._source is None:
            from grain.sources import ArrayRecordDataSource

            object.__setattr__(self, "_source", ArrayRecordDataSource([str(self.root / f) for f in self.files]))
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        # The readers stay behind: a worker opens its own.
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "_source": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)


def is_shard_folder(path: str | os.PathLike) -> bool:
    """A folder `pack` wrote (it holds SHARDS_MANIFEST)."""
    return (Path(path) / SHARDS_MANIFEST).is_file()


def open_shards(root: str | os.PathLike, classes: Sequence[str] | None = None) -> ShardSet:
    """The shards `pack` wrote into `root`, checked against their manifest before any image is read.

    **Raises:** DataError, one line naming the file: a manifest of another format or version, a
    shard missing, truncated or grown (its size differs from the manifest's), a file that is
    not an ArrayRecord shard or holds another number of records, classes that differ from
    `classes`.
    """
    root = Path(root)
    manifest_path = root / SHARDS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != SHARDS_FORMAT:
            raise ValueError(f"not a {SHARDS_FORMAT} manifest")
        if manifest.get("version") != SHARDS_VERSION:
            raise ValueError(f"version {manifest.get('version')}, this alexnet-jax reads version {SHARDS_VERSION}")
        classes_found, shards = manifest["classes"], manifest["shards"]
        labels = [int(label) for shard in shards for label in shard["labels"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path}: cannot be read as a shard manifest ({e})") from None
    _check_classes(root, classes_found, classes)
    for shard in shards:
        _check_shard(root / shard["file"], shard)
    return ShardSet(root, tuple(classes_found), tuple(s["file"] for s in shards), tuple(labels))


def _check_shard(path: Path, shard: dict[str, Any]) -> None:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: shard listed in {SHARDS_MANIFEST} cannot be read ({e.strerror or e})") from None
    if size != shard["bytes"]:
        raise DataError(
            f"{path}: {size} bytes where {SHARDS_MANIFEST} says {shard['bytes']}: truncated or replaced; pack again"
        )
    try:
        reader = ArrayRecordReader(str(path))
        try:
            count = reader.num_records() if reader.ok() else 0
            first = reader.read([0])[0] if count else b""
        finally:
            with contextlib.suppress(RuntimeError):  # closing a damaged file reports the damage again
                reader.close()
    except RuntimeError as e:  # Riegeli checks its block headers' and chunks' hashes
        raise DataError(f"{path}: not a readable ArrayRecord shard ({str(e).splitlines()[0][:200]})") from None
    if count != len(shard["labels"]):
        raise DataError(
            f"{path}: {count} records where {SHARDS_MANIFEST} says {len(shard['labels'])}: not this set's shard"
        )
    try:
        decode_record(first)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def open_data(path: str | os.PathLike, classes: Sequence[str] | None = None) -> ImageFolder | ShardSet:
    """A training or validation set: `pack`'s shards when `path` holds their manifest, else an ImageFolder."""
    return open_shards(path, classes) if is_shard_folder(path) else image_folder(path, classes)


def fingerprint(source: ImageFolder | ShardSet) -> dict[str, Any]:
    """What identifies a data set's contents, cheaply: its classes, its number of images and a SHA-256 of the
    sorted relative paths and sizes of its files (of a folder), or of its manifest (of shards).

    Saved with a run, so that `--resume` on a folder that changed since is noticed: the batches
    of a step would no longer be the ones it had. A stat per file, no image read.
    """
    h = hashlib.sha256()
    if isinstance(source, ShardSet):
        h.update((source.root / SHARDS_MANIFEST).read_bytes())
    else:
        for relative, size in sorted(
            (os.path.relpath(path, source.root), os.stat(path).st_size) for path, _ in source.samples
        ):
            h.update(f"{relative}\0{size}\n".encode())
    return {"classes": list(source.classes), "images": len(source), "digest": h.hexdigest()}


def fingerprint_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two `fingerprint`s, in words, or None when they are equal."""
    if before["classes"] != now["classes"]:
        added = sorted(set(now["classes"]) - set(before["classes"]))
        removed = sorted(set(before["classes"]) - set(now["classes"]))
        return f"classes changed (added: {', '.join(added) or '-'}; removed: {', '.join(removed) or '-'})"
    if before["images"] != now["images"]:
        return f"{before['images']} images then, {now['images']} now"
    if before["digest"] != now["digest"]:
        return f"the same {now['images']} images in number, but files were renamed, replaced or changed in size"
    return None
