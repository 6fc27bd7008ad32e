"""torchvision's `AlexNet_Weights.IMAGENET1K_V1.transforms()` on PIL images, in numpy.

Resize the shorter side to 256 (PIL bilinear, which antialiases), center-crop 224,
scale to [0, 1], normalize; returned NHWC so it feeds `AlexNet` directly. Every
step is the call torchvision makes (the same PIL resize, the same crop offsets, the
same float32 division and normalization), so on RGB images the result is bit-exact
(tests/test_preprocess.py checks it against torchvision itself).

torchvision's transform only works on 3-channel PIL images: it fails on L, LA, P,
RGBA, CMYK, I;16, ... because Normalize cannot broadcast 1, 2 or 4 channels in
place. Here every PIL mode is accepted (see `preprocess` for the rule per mode).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

RESIZE_SIZE = 256
CROP_SIZE = 224
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)

# Modes whose channels torchvision reads as R, G, B without converting: YCbCr, LAB and
# HSV also have 3 channels, and torchvision would silently feed them as if they were RGB.
_RGB_MODES = frozenset({"RGB"})
# One high-depth channel, kept at full precision through the resize (see `to_model_mode`).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes PIL cannot convert to RGB directly, and the mode it can go through.
_CONVERT_VIA = {"La": "LA"}
_UINT16_MAX = 65535


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)` output (width, height): the shorter side `size`, the long side
    int(size * long / short), truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    # torchvision's rule (`shorter_side_to`); an image already at that size is returned untouched.
    new_size = shorter_side_to(*image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BILINEAR)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    # torchvision rounds the offsets with Python's round(). Its zero padding for crops
    # larger than the image never happens here: the resize makes the short side >= the crop.
    h, w = array.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return array[top : top + size, left : left + size]


def to_model_mode(image: Image.Image) -> Image.Image:
    """`image` in a mode that the preprocessing reads: RGB, or one channel I;16 or F.

    - RGB: unchanged.
    - I;16, I;16L, I;16B, I;16N (16-bit grayscale PNG/TIFF): I;16 in native byte
      order, so the resize runs at 16 bits and the scale to [0, 1] is /65535. PIL's
      `convert("RGB")` would clip every value above 255 to white instead.
    - I (32-bit integer; Pillow's mode for 16-bit PGM and some TIFFs): read as
      16-bit, values clipped to [0, 65535]. torchvision's /(2**31 - 1) would make such
      images black.
    - F (32-bit float): kept; the values are taken to be in [0, 1], torchvision's
      convention for float images.
    - Every other mode (L, 1, P, PA, LA, La, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV):
      `convert("RGB")`, as torchvision's `ImageFolder` loader does (La, which PIL
      cannot convert directly, goes through LA). Alpha is dropped, not composited;
      premultiplied RGBa and La are unpremultiplied first; CMYK uses PIL's plain
      formula, without an ICC profile.
    """
    if image.mode in _RGB_MODES or image.mode == "F":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return image if image.mode == "I;16" else Image.fromarray(np.asarray(image).astype(np.uint16))
    if image.mode == "I":
        return Image.fromarray(np.clip(np.asarray(image), 0, _UINT16_MAX).astype(np.uint16))
    if image.mode in _CONVERT_VIA:
        image = image.convert(_CONVERT_VIA[image.mode])
    return image.convert("RGB")


def to_unit_float(array: np.ndarray) -> np.ndarray:
    """An image array as float32 in [0, 1] as torchvision's `convert_image_dtype` makes it.

    uint8 and uint16 are divided by their dtype's maximum; floats are taken to be in [0, 1] already
    and only cast. **Returns:** an array of the input's shape.
    """
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(_UINT16_MAX)
    return array.astype(np.float32)


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        try:
            return Image.fromarray(image)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"cannot read an array of shape {image.shape} and dtype {image.dtype} as an image "
                "(expected uint8 (H, W) / (H, W, 3) / (H, W, 4), uint16 (H, W) or float32 (H, W); "
                "images already preprocessed go to the model as one float (N, H, W, 3) array)"
            ) from e
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def normalize(array: np.ndarray) -> np.ndarray:
    """The last steps of `preprocess`: scale to [0, 1], grey to three channels, Normalize.

    **Arguments:** an (H, W, 3) uint8 array, or (H, W) uint16 / float32, as `to_model_mode`
    images give. **Returns:** float32 (H, W, 3).
    """
    x = to_unit_float(array)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    # Same float32 operations in the same order as torchvision's Normalize.
    return (x - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)


def to_uint8_rgb(array: np.ndarray) -> np.ndarray:
    """What `normalize` reads, as uint8 RGB: the pixels the training pipeline hands over (normalized on the device).

    uint8 (H, W, 3) is returned as it is, so `normalize(x)` and the device's normalization of
    `to_uint8_rgb(x)` agree to float32 rounding. One-channel 16-bit and float images (see
    `to_model_mode`) are rounded to 8 bits and repeated to three channels: their
    normalized values move by at most 0.5/255 before the division by the standard deviation.
    **Returns:** uint8 (H, W, 3).
    """
    if array.dtype == np.uint8:
        x = array
    elif array.dtype == np.uint16:
        x = np.round(array.astype(np.float32) * np.float32(255 / _UINT16_MAX)).astype(np.uint8)
    else:
        x = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * np.float32(255)).astype(np.uint8)
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def preprocess(
    image: Image.Image | np.ndarray, *, resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE
) -> np.ndarray:
    """One image as AlexNet's ImageNet input, as torchvision's IMAGENET1K_V1 transforms make it.

    **Arguments:** a PIL image of any size (at least 1x1) and any mode, or a numpy array
    that `PIL.Image.fromarray` reads (uint8 (H, W), (H, W, 3) or (H, W, 4); uint16 or
    float32 (H, W)). The mode is first brought to RGB, 16-bit or float grayscale by
    `to_model_mode`; grayscale is repeated to three channels after the resize and the
    scale to [0, 1], which gives the same numbers as converting first. `resize_size` and
    `crop_size` are torchvision's `Resize` and `CenterCrop` sizes (crop <= resize).
    **Returns:** float32 array of shape (crop_size, crop_size, 3), NHWC channel order (R, G, B).
    """
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} is larger than resize_size {resize_size}")
    image = to_model_mode(as_pil(image))
    resized = resize_shorter(image, resize_size)
    return normalize(center_crop(np.asarray(resized), crop_size))


def preprocess_batch(images: Iterable[Image.Image | np.ndarray]) -> np.ndarray:
    """Several images (any sizes and modes) as one batch. **Returns:** float32 (N, 224, 224, 3)."""
    arrays = [preprocess(image) for image in images]
    if not arrays:
        return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.float32)
    return np.stack(arrays)
