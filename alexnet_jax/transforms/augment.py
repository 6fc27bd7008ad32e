"""Per-image transforms for training and evaluation: torchvision's recipe and the 2012 paper's.

    x = train_transform(image, 224, rng)                    # RandomResizedCrop + flip, (224, 224, 3)
    x = paper_train_transform(image, 227, rng)              # 256x256, random 227 crop + flip
    x = IMAGENET_PCA.apply(x, rng)                          # + the paper's PCA colour noise
    xs = paper_eval_transform(image, 227, crops=10)         # (10, 227, 227, 3), TenCrop's order
    x = train_pixels(image, 224, rng, decode="reduced")     # uint8, the training pipeline's

Every function takes a PIL image of any mode (see `transforms.preprocess.to_model_mode`). The
`*_transform` functions return float32 NHWC arrays normalized as `alexnet_jax.transforms.preprocess`
does, so both architectures see inputs on the same scale; `predict` uses them. The `*_pixels`
functions return the same images as uint8 before normalization (`preprocess.to_uint8_rgb`), a
quarter of the bytes, which the training pipeline hands to the device to normalize there.
With `decode="reduced"` they ask JPEG's decoder for a 1/2, 1/4 or 1/8 scale image when the crop
still has at least the output's pixels there (`images.reduce_on_decode`): the crop boxes, flips
and random draws are those of `decode="exact"`, the pixels differ slightly. Needs only numpy
and Pillow.

The paper (Krizhevsky, Sutskever & Hinton 2012, sections 2 and 4.1): every image is
first rescaled so its shorter side is 256 and its central 256x256 patch kept; training
takes random 224x224 patches (227 is the size its layer arithmetic needs, the size
everyone uses) and their mirrors, plus
PCA colour noise: to every pixel add sum_i alpha_i lambda_i p_i, alpha_i ~ N(0, 0.1)
drawn once per image, p_i and lambda_i the eigenvectors and eigenvalues of the 3x3
covariance of RGB pixel values. At test time it averages the softmax over the four
corner patches, the centre patch and their mirrors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from alexnet_jax.transforms.images import decode as decode_pixels
from alexnet_jax.transforms.images import reduce_on_decode
from alexnet_jax.transforms.preprocess import (
    CROP_SIZE,
    MEAN_RGB,
    RESIZE_SIZE,
    STDDEV_RGB,
    as_pil,
    center_crop,
    normalize,
    shorter_side_to,
    to_model_mode,
    to_uint8_rgb,
)

# torchvision's RandomResizedCrop defaults and its reference recipe's flip probability.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5
_CROP_ATTEMPTS = 10  # torchvision tries 10 random boxes before falling back to a center crop

# The paper's fixed-resolution data set: shorter side 256, central 256x256.
PAPER_SQUARE_SIZE = 256
# Test-time crops: 1 (the centre) or TenCrop's 10.
EVAL_CROPS = (1, 10)
# The paper's standard deviation of the alphas.
PCA_ALPHA_STD = 0.1
# How the training pipeline decodes: the full image ("exact", torchvision's pixels) or a JPEG
# reduced while decoding to no less than the crop needs ("reduced").
DECODE_MODES = ("reduced", "exact")

# What a transform's image array becomes at the end: normalized float32 or uint8 pixels.
Finish = Callable[[np.ndarray], np.ndarray]


def check_decode(decode: str) -> None:
    """**Raises:** ValueError unless `decode` is one of DECODE_MODES."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")


def resize_region(image: Image.Image | np.ndarray, size: tuple[int, int], box, decode: str = "exact") -> Image.Image:
    """The region `box` (left, top, right, bottom) of `image`, resized to `size` with PIL's bilinear, in model mode.

    "exact" decodes everything, crops and resizes (torchvision's `resized_crop`); "reduced"
    first asks the decoder for the smallest image that still has `size` pixels in the box.
    """
    image = as_pil(image)
    left, top, right, bottom = box
    factor = reduce_on_decode(image, right - left, bottom - top, *size) if decode == "reduced" else 1.0
    image = to_model_mode(decode_pixels(image))
    if factor == 1.0:
        if box != (0, 0, *image.size):
            image = image.crop(box)
        return image if image.size == size else image.resize(size, Image.BILINEAR)
    return image.resize(size, Image.BILINEAR, box=tuple(v * factor for v in box))


def _flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.uniform() < FLIP_PROBABILITY else image


# --- torchvision's reference recipe --------------------------------------------------------


def eval_resize_size(image_size: int) -> int:
    """torchvision's 256/224 resize-to-crop ratio at another crop size: round(S * 256 / 224)."""
    return RESIZE_SIZE if image_size == CROP_SIZE else round(image_size * RESIZE_SIZE / CROP_SIZE)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: a box of random area and aspect ratio.

    **Returns:** (left, top, box width, box height) in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image, cropped to the ratio range, centered.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _train_crop(image: Image.Image, image_size: int, rng: np.random.Generator, decode: str) -> np.ndarray:
    left, top, w, h = random_resized_crop_box(*image.size, rng)
    crop = resize_region(image, (image_size, image_size), (left, top, left + w, top + h), decode)
    return np.asarray(_flip(crop, rng))


def train_transform(image: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop(image_size) + horizontal flip (p 0.5), then `preprocess`'s normalization.

    **Returns:** float32 (image_size, image_size, 3), normalized, NHWC.
    """
    return normalize(_train_crop(image, image_size, rng, "exact"))


def train_pixels(image: Image.Image, image_size: int, rng: np.random.Generator, decode: str = "exact") -> np.ndarray:
    """`train_transform`'s crop and flip (the same draws from `rng`) as uint8 pixels.

    **Returns:** uint8 (image_size, image_size, 3), NHWC.
    """
    return to_uint8_rgb(_train_crop(image, image_size, rng, decode))


def _eval_crops(image: Image.Image, image_size: int, crops: int, resize_size: int, finish: Finish, decode: str):
    # Resize(resize_size) + CenterCrop(image_size) or TenCrop(image_size), `finish`ed.
    _check_crops(crops)
    image = as_pil(image)
    resized = np.asarray(resize_region(image, shorter_side_to(*image.size, resize_size), (0, 0, *image.size), decode))
    # One crop is finished alone (less to normalize); ten crops come from the finished image,
    # which is three-channel whatever the mode.
    return finish(center_crop(resized, image_size)) if crops == 1 else ten_crop(finish(resized), image_size)


def eval_transform(image: Image.Image, image_size: int = CROP_SIZE, crops: int = 1) -> np.ndarray:
    """torchvision's inference preprocessing at `image_size` (exactly `preprocess` at 224), or its TenCrop.

    `crops=10` is `Resize(round(S * 256 / 224))` + `TenCrop(S)`, the usual ten-crop
    evaluation of torchvision models.
    **Returns:** float32 (S, S, 3), or (10, S, S, 3) for `crops=10`; normalized, NHWC.
    """
    return _eval_crops(image, image_size, crops, eval_resize_size(image_size), normalize, "exact")


def eval_pixels(image: Image.Image, image_size: int = CROP_SIZE, crops: int = 1, decode: str = "exact") -> np.ndarray:
    """`eval_transform`'s crops as uint8 pixels. **Returns:** uint8 (S, S, 3), or (10, S, S, 3)."""
    return _eval_crops(image, image_size, crops, eval_resize_size(image_size), to_uint8_rgb, decode)


# --- The 2012 paper -----------------------------------------------------------------------


def _paper_square(image: Image.Image, finish: Finish, decode: str) -> np.ndarray:
    return _eval_crops(image, PAPER_SQUARE_SIZE, 1, PAPER_SQUARE_SIZE, finish, decode)


def paper_square_pixels(image: Image.Image, decode: str = "exact") -> np.ndarray:
    """`paper_square` as uint8 pixels (what `pack --arch 2012` stores). **Returns:** uint8 (256, 256, 3)."""
    return _paper_square(image, to_uint8_rgb, decode)


def paper_square(image: Image.Image) -> np.ndarray:
    """The paper's 256x256 version of an image: shorter side to 256 (PIL bilinear), the central 256x256.

    **Returns:** float32 (256, 256, 3), normalized, NHWC.
    """
    return _paper_square(image, normalize, "exact")


def _check_crop_size(image_size: int) -> None:
    if not 1 <= image_size <= PAPER_SQUARE_SIZE:
        raise ValueError(
            f"crop size {image_size} does not fit the paper's {PAPER_SQUARE_SIZE}x{PAPER_SQUARE_SIZE} images"
        )


def _paper_crop(image: Image.Image, image_size: int, rng: np.random.Generator, finish: Finish, decode: str):
    _check_crop_size(image_size)
    square = _paper_square(image, finish, decode)
    top, left = (int(rng.integers(0, PAPER_SQUARE_SIZE - image_size + 1)) for _ in range(2))
    crop = square[top : top + image_size, left : left + image_size]
    return crop[:, ::-1].copy() if rng.uniform() < FLIP_PROBABILITY else crop.copy()


def paper_train_transform(image: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random `image_size` crop of `paper_square(image)`, mirrored with probability 0.5.

    The offsets are uniform over all 256 - S + 1 positions in each direction.
    Colour noise is a separate step (`ColourPCA.apply`), as the data pipeline runs it.
    **Returns:** float32 (image_size, image_size, 3), normalized, NHWC.
    """
    return _paper_crop(image, image_size, rng, normalize, "exact")


def paper_train_pixels(
    image: Image.Image, image_size: int, rng: np.random.Generator, decode: str = "exact"
) -> np.ndarray:
    """`paper_train_transform`'s crop and mirror (the same draws) as uint8 pixels. **Returns:** uint8 (S, S, 3)."""
    return _paper_crop(image, image_size, rng, to_uint8_rgb, decode)


def _paper_eval(image: Image.Image, image_size: int, crops: int, finish: Finish, decode: str) -> np.ndarray:
    _check_crops(crops)
    _check_crop_size(image_size)
    square = _paper_square(image, finish, decode)
    return center_crop(square, image_size).copy() if crops == 1 else ten_crop(square, image_size)


def paper_eval_transform(image: Image.Image, image_size: int, crops: int = 1) -> np.ndarray:
    """The paper's test input: the centre `image_size` crop of `paper_square(image)`, or its ten crops.

    **Returns:** float32 (S, S, 3), or (10, S, S, 3) for `crops=10` in `ten_crop`'s order.
    """
    return _paper_eval(image, image_size, crops, normalize, "exact")


def paper_eval_pixels(image: Image.Image, image_size: int, crops: int = 1, decode: str = "exact") -> np.ndarray:
    """`paper_eval_transform`'s crops as uint8 pixels. **Returns:** uint8 (S, S, 3), or (10, S, S, 3)."""
    return _paper_eval(image, image_size, crops, to_uint8_rgb, decode)


def _check_crops(crops: int) -> None:
    if crops not in EVAL_CROPS:
        raise ValueError(f"eval crops must be one of {', '.join(map(str, EVAL_CROPS))}, got {crops}")


def five_crop(array: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's `five_crop`: top-left, top-right, bottom-left, bottom-right, centre.

    **Arguments:** an (H, W, C) array with H, W >= size. **Returns:** five (size, size, C) views.
    """
    h, w = array.shape[:2]
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the image ({h}x{w})")
    return [
        array[:size, :size],
        array[:size, w - size :],
        array[h - size :, :size],
        array[h - size :, w - size :],
        center_crop(array, size),
    ]


def ten_crop(array: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `TenCrop(size)`: `five_crop` of the image, then `five_crop` of its mirror.

    As in torchvision, crop 5 + k is crop k of the mirrored image (so crop 5 is the
    mirror of crop 1, the top-right corner, not of crop 0).
    **Returns:** (10, size, size, C).
    """
    return np.stack(five_crop(array, size) + five_crop(array[:, ::-1], size))


@dataclasses.dataclass(frozen=True)
class ColourPCA:
    """The paper's colour noise: add V (alpha * eigvals) to every pixel, alpha ~ N(0, alpha_std^2) per image.

    `eigvals` (3,) and `eigvecs` (3x3, eigenvector i in column i) describe the
    covariance of RGB pixel values on the [0, 1] scale; the added colour has
    covariance V diag(eigvals^2 * alpha_std^2) V^T. Plain tuples, so it pickles to
    the data workers and writes to JSON.
    """

    eigvals: tuple[float, float, float]
    eigvecs: tuple[tuple[float, float, float], ...]
    alpha_std: float = PCA_ALPHA_STD

    def noise(self, rng: np.random.Generator) -> np.ndarray:
        """One image's RGB offset on the [0, 1] scale: float64 (3,)."""
        alpha = rng.normal(0.0, self.alpha_std, 3)
        return np.asarray(self.eigvecs) @ (alpha * np.asarray(self.eigvals))

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`image` (normalized, (..., 3)) with one draw of the noise added to every pixel.

        Adding c to a [0, 1] pixel adds c / std to the normalized one, so the noise is
        added after `normalize` and equals adding it before. Nothing is clipped (the paper
        does not say it clipped).
        **Returns:** float32, the shape of `image`.
        """
        return (image + self.offset(rng)).astype(np.float32)

    def offset(self, rng: np.random.Generator) -> np.ndarray:
        """One draw of the noise on the normalized scale (c / std for a [0, 1] offset c): what `apply` adds,
        and what the training pipeline hands over for the device to add. **Returns:** float32 (3,).
        """
        return (self.noise(rng) / np.asarray(STDDEV_RGB)).astype(np.float32)


# ImageNet's published values (Krizhevsky's cuda-convnet numbers as fb.resnet.torch and
# most re-implementations use them, for RGB on the [0, 1] scale), largest first.
IMAGENET_PCA = ColourPCA(
    eigvals=(0.2175, 0.0188, 0.0045),
    eigvecs=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203)),
)


def pixel_moments(images: Iterable[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Running sums for a pixel covariance: (count, sum (3,), sum of outer products (3, 3)), float64.

    **Arguments:** normalized (H, W, 3) arrays, as `paper_square` gives them; the sums are
    of the [0, 1] values (normalization undone).
    """
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    mean, std = np.asarray(MEAN_RGB), np.asarray(STDDEV_RGB)
    for image in images:
        pixels = image.reshape(-1, 3).astype(np.float64) * std + mean
        count += len(pixels)
        total += pixels.sum(axis=0)
        outer += pixels.T @ pixels
    return count, total, outer


def colour_pca_from_moments(count: int, total: np.ndarray, outer: np.ndarray) -> ColourPCA:
    """The eigen-decomposition of the pixel covariance the sums describe, largest eigenvalue first.

    Each eigenvector's sign is chosen so its largest-magnitude entry is negative, as in
    ImageNet's published first eigenvector (the noise is symmetric, so the sign changes
    nothing but the numbers printed).
    """
    if count < 2:
        raise ValueError("a colour PCA needs at least two pixels")
    mean = total / count
    covariance = (outer - count * np.outer(mean, mean)) / (count - 1)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
    signs = -np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(3)])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    return ColourPCA(
        eigvals=tuple(float(v) for v in eigvals),
        eigvecs=tuple(tuple(float(v) for v in row) for row in eigvecs),
    )
