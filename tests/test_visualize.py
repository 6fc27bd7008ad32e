"""The conv1 filter grid: layout, orientation and scaling, on kernels whose picture is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.inference.pictures import filter_grid, save_conv1_filters


def test_grid_layout_and_orientation():
    kernel = np.zeros((11, 11, 3, 64), np.float32)
    kernel[0, 10, 0, 0] = 1.0  # filter 0: one red pixel, top row, right column
    kernel[:, :, 2, 9] = np.arange(11)[:, None]  # filter 9 (row 1, column 1): blue growing downwards
    grid = filter_grid(kernel, scale=3, gap=2, background=255)
    tile = 11 * 3
    assert grid.shape == (8 * (tile + 2) + 2, 8 * (tile + 2) + 2, 3) and grid.dtype == np.uint8
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # outer gap
    first = grid[2 : 2 + tile, 2 : 2 + tile]
    np.testing.assert_array_equal(first[0, -1], (255, 0, 0))  # each filter stretched to [0, 255] on its own
    np.testing.assert_array_equal(first[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(first[:3, -3:], np.broadcast_to(np.array([255, 0, 0], np.uint8), (3, 3, 3)))
    top = left = 2 + tile + 2
    tenth = grid[top : top + tile, left : left + tile]
    assert (tenth[:, :, 2][0] == 0).all() and (tenth[:, :, 2][-1] == 255).all()
    assert (np.diff(tenth[::3, 0, 2].astype(int)) > 0).all()
    assert (tenth[:, :, :2] == 0).all()


def test_constant_filter_is_not_nan():
    grid = filter_grid(np.ones((5, 5, 3, 2), np.float32), columns=2, scale=1, gap=1)
    assert (grid[1:6, 1:6] == 0).all()


def test_rejects_non_rgb_kernels():
    with pytest.raises(ValueError, match=r"expected a kernel of shape \(kh, kw, 3, n\)"):
        filter_grid(np.zeros((5, 5, 64, 192)))


def test_save_conv1_png(tmp_path, rng):
    kernel = rng.standard_normal((11, 11, 3, 64)).astype(np.float32)
    path = save_conv1_filters(tmp_path / "conv1.png", {"params": {"features_0": {"kernel": kernel}}})
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), filter_grid(kernel))
