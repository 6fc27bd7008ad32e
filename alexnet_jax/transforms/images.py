"""Image files: which suffixes count, reading one with a one-line reason, walking folders.

Shared by everything that reads images from disk (classification, the training data,
LPIPS), so that one rule decides which files are images and how folders are walked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError


def _image_suffixes() -> frozenset[str]:
    Image.init()  # registers every plugin, so the table is complete
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# Suffixes Pillow can open (.jpg, .png, .webp, .tif, ...): what a folder walk picks up.
IMAGE_SUFFIXES = _image_suffixes()


class ImageReadError(ValueError):
    """An image file that cannot be used; the message is one line, without the path."""


def load_image(path: str | os.PathLike, *, exif: bool = False) -> Image.Image:
    """Read and decode one image file completely (so truncation shows here, not later).

    `exif=True` applies the EXIF orientation (`ImageOps.exif_transpose`); the
    default ignores it, as torchvision's loaders do.
    **Raises:** ImageReadError with a one-line reason: no such file, not an image,
    truncated or corrupt, over Pillow's decompression-bomb limit.
    """
    with open_image(path) as image:
        decode(image)
        return ImageOps.exif_transpose(image) if exif else image


def open_image(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open an image file (a path or a binary file object) and read its header only: size and mode, no pixels.

    What the training pipeline opens with, so that a crop can be drawn from the size and the
    decoder asked for no more pixels than the crop needs (`reduce_on_decode`) before `decode`.
    Use it as a context manager, which closes the file.
    **Raises:** ImageReadError as `load_image` does.
    """
    with _read_errors():
        return Image.open(source)


def decode(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image `open_image` opened (nothing happens when they are decoded already).

    **Returns:** `image`. **Raises:** ImageReadError for a truncated or corrupt file.
    """
    with _read_errors():
        image.load()
    return image


@contextlib.contextmanager
def _read_errors() -> Iterator[None]:
    # Pillow's and the OS's exceptions as one-line reasons, the same for every reader.
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError("no such file") from None
    except IsADirectoryError:
        raise ImageReadError("is a folder, not an image file") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image (Pillow cannot identify the file)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"refused as a possible decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, ... on bad bytes
        raise ImageReadError(f"truncated or corrupt image ({type(e).__name__}: {e})") from None


# JPEG's decoder scales by these factors at almost no cost (it drops DCT coefficients).
DECODE_REDUCTIONS = (8, 4, 2, 1)


def reduce_on_decode(image: Image.Image, box_width: float, box_height: float, width: int, height: int) -> float:
    """Ask the decoder of a not yet decoded image for a smaller version, when a box of it is all that is needed.

    The largest reduction (1/8, 1/4, 1/2) is asked for that keeps a `box_width` x
    `box_height` region of the original at least `width` x `height` pixels, so resizing
    that region to (width, height) still only shrinks. Only JPEG's decoder can do this
    (libjpeg scales while it decodes, through Pillow's `Image.draft`); other formats decode
    whole. The pixels differ slightly from a full decode followed by the same resize.
    **Returns:** the factor from original to decoded coordinates (1.0, or 1/2, 1/4, 1/8):
    original pixel (x, y) is decoded pixel (x * f, y * f).
    """
    full_width, full_height = image.size
    room = min(box_width / width, box_height / height)
    reduction = next((r for r in DECODE_REDUCTIONS if r <= room), 1)
    if reduction == 1 or image.format != "JPEG":
        return 1.0
    # Pillow picks the largest power of two <= min(W // w, H // h); these sizes make that `reduction`.
    drafted = image.draft(image.mode, (full_width // reduction, full_height // reduction))
    if drafted is None:  # already decoded, or a JPEG layout the decoder cannot scale
        return 1.0
    return drafted[1][2] / full_width


def is_image_name(path: str | os.PathLike) -> bool:
    """A visible file whose suffix Pillow reads: what a folder walk takes as an image."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


@dataclass
class Walk:
    """What `walk_images` found under one folder, each list in walk order."""

    images: list[Path] = field(default_factory=list)
    other_files: list[Path] = field(default_factory=list)  # visible files without an image suffix
    problems: list[str] = field(default_factory=list)  # one line each: unreadable folders, link loops


def folder_identity(path: str | os.PathLike) -> tuple[int, int]:
    """(st_dev, st_ino) of the folder `path` leads to, links followed: equal for two paths to one folder."""
    info = Path(path).stat()
    return info.st_dev, info.st_ino


def walk_images(folder: str | os.PathLike, *, indexed: set[tuple[int, int]] | None = None) -> Walk:
    """The image files under `folder`, recursively: a folder's files (sorted by name), then its sub-folders (sorted).

    Hidden files and folders (a leading dot) are left out. Links are followed, as
    torchvision's `ImageFolder` follows them, but a link back to a folder being walked
    (a loop) is not entered again: it is reported once in `problems`. `indexed` holds the
    identities (`folder_identity`) of folders that are, or will be, indexed elsewhere (the
    other class folders of a data set, say): a link into one of them is reported and not
    followed either, so no image is indexed twice; the walk adds every folder it enters. A
    sub-folder that cannot be listed is reported there too and walked no further.
    """
    walk = Walk()
    _walk(Path(folder), frozenset(), walk, set() if indexed is None else indexed)
    return walk


def _walk(folder: Path, ancestors: frozenset[tuple[int, int]], walk: Walk, indexed: set[tuple[int, int]]) -> None:
    try:
        info = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        walk.problems.append(f"{folder}: cannot list the folder ({e.strerror or e})")
        return
    identity = (info.st_dev, info.st_ino)
    ancestors = ancestors | {identity}
    indexed.add(identity)
    folders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if _is_dir(entry):
            folders.append(path)
        else:
            (walk.images if is_image_name(path) else walk.other_files).append(path)
    for path in folders:
        try:
            identity = folder_identity(path)
        except OSError as e:
            walk.problems.append(f"{path}: cannot list the folder ({e.strerror or e})")
            continue
        if identity in ancestors:
            walk.problems.append(f"{path}: a link back to {path.resolve()}, which contains it; not followed")
            continue
        if identity in indexed:
            walk.problems.append(f"{path}: a link to {path.resolve()}, whose images are indexed already; not followed")
            continue
        _walk(path, ancestors, walk, indexed)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False
