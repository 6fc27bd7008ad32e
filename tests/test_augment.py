"""The 2012 paper's augmentation: PCA colour noise statistics, ten crops against torchvision, random crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.archs import ARCHS
from alexnet_jax.training.pipeline import colour_pca_from_folder, eval_batches, image_folder, train_batches
from alexnet_jax.transforms.augment import (
    IMAGENET_PCA,
    PAPER_SQUARE_SIZE,
    eval_transform,
    paper_eval_pixels,
    paper_eval_transform,
    paper_square,
    paper_train_transform,
    ten_crop,
)
from alexnet_jax.transforms.preprocess import MEAN_RGB, STDDEV_RGB

MEAN, STD = np.asarray(MEAN_RGB), np.asarray(STDDEV_RGB)


def _torch_normalized(tensor) -> np.ndarray:
    from torchvision.transforms import functional as F

    return F.normalize(F.to_tensor(tensor), MEAN_RGB, STDDEV_RGB).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of small photos whose channels are correlated unevenly (a non-trivial covariance)."""
    root = tmp_path_factory.mktemp("pca") / "train"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            base = rng.uniform(0, 255, (24, 32, 1))
            pixels = base * np.array([1.0, 0.6, 0.2]) + rng.normal(0, 30, (24, 32, 3)) * np.array([0.3, 1.0, 0.5])
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_colour_noise_has_the_stated_covariance():
    """Over 40,000 draws the sample covariance is within 3% of its largest entry of V diag(lambda^2 * 0.01) V^T
    (sampling error of a covariance from n draws ~ sqrt(2/n) = 0.7%)."""
    rng = np.random.default_rng(0)
    draws = np.stack([IMAGENET_PCA.noise(rng) for _ in range(40_000)])
    vectors, values = np.asarray(IMAGENET_PCA.eigvecs), np.asarray(IMAGENET_PCA.eigvals)
    expected = vectors @ np.diag(values**2 * 0.1**2) @ vectors.T
    np.testing.assert_allclose(np.cov(draws, rowvar=False), expected, rtol=0, atol=0.03 * np.abs(expected).max())
    np.testing.assert_allclose(draws.mean(axis=0), 0, atol=3 * np.sqrt(np.diag(expected) / len(draws)).max())


def test_colour_noise_is_one_rgb_offset_per_image_on_the_unit_scale(photos):
    x = paper_square(photos["chelsea"])
    noisy = IMAGENET_PCA.apply(x, np.random.default_rng(3))
    offset = IMAGENET_PCA.noise(np.random.default_rng(3))  # the same draw
    # Undo the normalization: every [0, 1] pixel moved by the same RGB offset.
    moved = (noisy * STD + MEAN) - (x * STD + MEAN)
    np.testing.assert_allclose(moved, np.broadcast_to(offset, moved.shape), rtol=0, atol=1e-5)
    assert noisy.dtype == np.float32 and np.abs(offset).max() > 1e-3


def test_colour_pca_of_a_folder_is_eigh_of_its_pixel_covariance(folder):
    """Eigenvalues to 1e-9 relative, eigenvectors up to sign to 1e-6: both sides are float64 on the same pixels."""
    pca = colour_pca_from_folder(image_folder(folder))
    pixels = np.concatenate(
        [paper_square(Image.open(p)).reshape(-1, 3) * STD + MEAN for p in sorted(folder.glob("*/*.png"))]
    )
    values, vectors = np.linalg.eigh(np.cov(pixels, rowvar=False))
    values, vectors = values[::-1], vectors[:, ::-1]  # largest first, as published
    np.testing.assert_allclose(pca.eigvals, values, rtol=1e-9)
    ours = np.asarray(pca.eigvecs)
    np.testing.assert_allclose(np.abs(np.sum(ours * vectors, axis=0)), 1.0, atol=1e-6)
    assert values[0] > 2 * values[1] > 0  # the test data has a dominant direction: the comparison means something


@pytest.mark.torch
def test_ten_crops_are_torchvisions_tencrop_on_a_photo(torchvision, photos):
    """Bit-exact where the resize is the same PIL call: torchvision's order, mirrors and all."""
    from torchvision import transforms as T

    image = photos["chelsea"]  # 451x300: corners differ from the centre and from each other
    theirs = [_torch_normalized(c) for c in T.Compose([T.Resize(256), T.TenCrop(224)])(image)]
    ours = eval_transform(image, 224, crops=10)
    assert ours.shape == (10, 224, 224, 3)
    np.testing.assert_allclose(ours, np.stack(theirs), rtol=0, atol=1e-6)

    paper = [_torch_normalized(c) for c in T.Compose([T.Resize(256), T.CenterCrop(256), T.TenCrop(227)])(image)]
    ours = paper_eval_transform(image, 227, crops=10)
    np.testing.assert_allclose(ours, np.stack(paper), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(paper_eval_transform(image, 227), ours[4])  # one crop: the centre
    assert len({c.tobytes() for c in ours}) == 10


def test_paper_train_crops_cover_the_square_and_mirror(photos):
    image = photos["coffee"]
    square = paper_square(image)
    offsets, flips = set(), set()
    for seed in range(40):
        crop = paper_train_transform(image, 227, np.random.default_rng(seed))
        draw = np.random.default_rng(seed)
        top, left = int(draw.integers(0, 30)), int(draw.integers(0, 30))
        flip = draw.uniform() < 0.5
        expected = square[top : top + 227, left : left + 227]
        np.testing.assert_array_equal(crop, expected[:, ::-1] if flip else expected)
        offsets.add((top, left))
        flips.add(flip)
    assert flips == {True, False} and len(offsets) > 30
    assert square.shape == (PAPER_SQUARE_SIZE, PAPER_SQUARE_SIZE, 3)
    with pytest.raises(ValueError, match="crop size 300 does not fit the paper's 256x256 images"):
        paper_train_transform(image, 300, np.random.default_rng(0))
    with pytest.raises(ValueError, match="eval crops must be one of 1, 10, got 5"):
        paper_eval_transform(image, 227, crops=5)


def test_paper_batches_crop_flip_add_noise_and_ten_crop(folder):
    data, paper = image_folder(folder), ARCHS["2012"]
    plain = next(iter(train_batches(data, batch_size=2, image_size=227, seed=0, num_steps=1, arch=paper)))
    noisy = next(
        iter(
            train_batches(data, batch_size=2, image_size=227, seed=0, num_steps=1, arch=paper, colour_pca=IMAGENET_PCA)
        )
    )
    assert plain["image"].shape == (2, 227, 227, 3) and plain["image"].dtype == np.uint8
    # Same crops and flips (drawn first), then one RGB offset per image, for the device to add.
    np.testing.assert_array_equal(noisy["image"], plain["image"])
    assert "colour" not in plain and noisy["colour"].shape == (2, 3)
    assert not np.allclose(noisy["colour"][0], noisy["colour"][1])
    evals = list(eval_batches(data, batch_size=4, image_size=227, arch=paper, crops=10))
    assert len(evals) == 1 and evals[0]["image"].shape == (4, 10, 227, 227, 3)
    np.testing.assert_array_equal(evals[0]["image"][0], paper_eval_pixels(Image.open(data.samples[0][0]), 227, 10))


def test_ten_crop_refuses_a_crop_larger_than_the_image():
    with pytest.raises(ValueError, match=r"crop size 5 is larger than the image \(4x6\)"):
        ten_crop(np.zeros((4, 6, 3)), 5)
