"""`preprocess` against torchvision's own IMAGENET1K_V1 transforms.

Tolerance: none. Every comparison is bit-exact (assert_array_equal), because the
same PIL resize, the same crop and the same float32 operations are used. For modes
that torchvision's transform rejects, the reference is torchvision on the image we
say we read instead: `image.convert("RGB")`, or torchvision's own steps on the
single 16-bit / float channel, repeated to 3 channels before Normalize.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import CROP_SIZE, preprocess, preprocess_batch

# Every test here compares against torchvision (the module's fixtures load it).
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def transforms(torchvision):
    return torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()


def _nhwc(tensor) -> np.ndarray:
    return tensor.numpy().transpose(1, 2, 0)


def _torchvision_single_channel(transforms, image: Image.Image) -> np.ndarray:
    """torchvision's steps of `transforms` on a 1-channel image, repeated to 3 channels before Normalize.

    torchvision itself fails there only because Normalize cannot broadcast one channel in place.
    """
    import torch
    from torchvision.transforms import functional as F

    x = F.resize(image, transforms.resize_size, interpolation=transforms.interpolation, antialias=True)
    x = F.convert_image_dtype(F.pil_to_tensor(F.center_crop(x, transforms.crop_size)), torch.float)
    return _nhwc(F.normalize(x.expand(3, -1, -1), mean=transforms.mean, std=transforms.std))


def _noise(rng, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def test_photos_bit_exact(transforms, photos):
    for name, image in photos.items():
        np.testing.assert_array_equal(preprocess(image), _nhwc(transforms(image)), err_msg=name)


@pytest.mark.parametrize(
    "size",
    [
        (1, 1),
        (7, 5),  # smaller than 224 on both sides: upsampled
        (100, 300),
        (223, 224),
        (224, 224),
        (256, 256),  # already at the resize target: torchvision skips the resize
        (256, 400),
        (301, 256),
        (4, 1000),  # extreme aspect ratios: the long side becomes 64,000 pixels
        (1000, 4),
    ],
)
def test_sizes_bit_exact(transforms, rng, size):
    image = _noise(rng, size)
    out = preprocess(image)
    assert out.shape == (CROP_SIZE, CROP_SIZE, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, _nhwc(transforms(image)))


@pytest.mark.parametrize(
    "mode", ["L", "1", "P", "PA", "LA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]
)
def test_modes_as_torchvision_on_convert_rgb(transforms, photos, rng, mode):
    rgb = photos["coffee"].resize((301, 233))
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        # Random alpha: PIL resizes alpha modes premultiplied, so resizing before dropping it would show.
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, rgb.size[::-1], dtype=np.uint8)))
        image = rgba.convert("LA").convert("La") if mode == "La" else rgba.convert(mode)
    elif mode == "P":
        image = rgb.quantize(64)
    else:
        image = rgb.convert(mode)
    assert image.mode == mode
    as_rgb = (image.convert("LA") if mode == "La" else image).convert("RGB")  # PIL has no La -> RGB
    np.testing.assert_array_equal(preprocess(image), _nhwc(transforms(as_rgb)))


def test_grayscale_equals_torchvision_steps_on_one_channel(transforms, photos):
    gray = photos["chelsea"].convert("L")
    np.testing.assert_array_equal(preprocess(gray), _torchvision_single_channel(transforms, gray))


def test_three_channel_non_rgb_is_converted_not_read_as_rgb(transforms, photos):
    # torchvision feeds YCbCr's Y, Cb, Cr as if they were R, G, B; we convert.
    ycbcr = photos["astronaut"].convert("YCbCr")
    assert not np.allclose(preprocess(ycbcr), _nhwc(transforms(ycbcr)), atol=0.1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_keeps_full_range(transforms, rng, mode):
    values = rng.integers(0, 65536, (230, 300), dtype=np.uint16)
    image = Image.fromarray(values)
    if mode != "I;16":
        image = Image.fromarray(values.astype(">u2"))
    assert image.mode == mode
    reference = _torchvision_single_channel(transforms, Image.fromarray(values))
    np.testing.assert_array_equal(preprocess(image), reference)


def test_sixteen_bit_photo_matches_its_eight_bit_version(photos):
    # The same picture stored at 16 bits must look like the 8-bit one, not clipped to white
    # as PIL's convert("RGB") would make it. Bound: one 8-bit step (1/255) over the smallest
    # std 0.224, plus the 8-bit resize's rounding (another step).
    gray8 = np.asarray(photos["chelsea"].convert("L"))
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert gray16.mode == "I;16"
    diff = np.abs(preprocess(gray16) - preprocess(Image.fromarray(gray8)))
    assert diff.max() <= 2 / 255 / 0.224
    assert diff.max() > 0  # resized at 16 bits, not rounded back to 8


def test_mode_i_read_as_sixteen_bit_and_clipped(transforms, rng):
    values = rng.integers(-1000, 70000, (240, 260), dtype=np.int32)  # out-of-range on both sides
    image = Image.fromarray(values)
    assert image.mode == "I"
    clipped = Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16))
    np.testing.assert_array_equal(preprocess(image), _torchvision_single_channel(transforms, clipped))


def test_float_mode_taken_as_unit_range(transforms, rng):
    image = Image.fromarray(rng.random((250, 230), dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(preprocess(image), _torchvision_single_channel(transforms, image))


def test_numpy_input_equals_pil_input(photos):
    image = photos["rocket"]
    np.testing.assert_array_equal(preprocess(np.asarray(image)), preprocess(image))
    gray = np.asarray(image.convert("L"))
    np.testing.assert_array_equal(preprocess(gray), preprocess(Image.fromarray(gray)))


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="cannot read an array of shape"):
        preprocess(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(TypeError, match="expected a PIL image or a numpy array, got str"):
        preprocess("cat.jpg")


def test_batch(photos, rng):
    images = [photos["chelsea"], _noise(rng, (50, 400), "L")]
    batch = preprocess_batch(images)
    assert batch.shape == (2, CROP_SIZE, CROP_SIZE, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(images[1]))
    assert preprocess_batch([]).shape == (0, CROP_SIZE, CROP_SIZE, 3)
