"""torchvision's `AlexNet_Weights.IMAGENET1K_V1.transforms()` on PIL images, in numpy.

Resize the shorter side to 256 (PIL bilinear, which antialiases), center-crop 224,
scale to [0, 1], normalize; returned NHWC so it feeds `AlexNet` directly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

RESIZE_SIZE = 256
CROP_SIZE = 224
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    # torchvision's rule: the long side is int(size * long / short), truncated, and an
    # image already at that size is returned untouched.
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def _center_crop(array: np.ndarray, size: int) -> np.ndarray:
    # torchvision pads with zeros when the crop is larger than the image, then
    # rounds the offsets with Python's round().
    h, w = array.shape[:2]
    if size > h or size > w:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        pad = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pad)
        h, w = array.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return array[top : top + size, left : left + size]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image | np.ndarray) -> np.ndarray:
    """One image as AlexNet's ImageNet input.

    **Arguments:** a PIL image of any size, or a uint8 array of shape (H, W, 3).
    **Returns:** float32 array of shape (224, 224, 3), NHWC channel order.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = _resize_shorter(to_rgb(image), RESIZE_SIZE)
    x = _center_crop(np.asarray(image), CROP_SIZE).astype(np.float32) / np.float32(255)
    # Same float32 operations in the same order as torchvision's Normalize.
    return (x - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)


def preprocess_batch(images: Iterable[Image.Image | np.ndarray]) -> np.ndarray:
    """Several images as one batch of shape (N, 224, 224, 3) float32."""
    return np.stack([preprocess(image) for image in images])
