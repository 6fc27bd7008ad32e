"""Pictures of learned weights, drawn with numpy and Pillow only (no matplotlib)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.models.trees import params_of


def filter_grid(
    kernel: np.ndarray,
    *,
    columns: int = 8,
    scale: int = 4,
    gap: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Convolution kernels with 3 input channels as one RGB picture, as in AlexNet's Figure 3.

    Each filter is stretched to [0, 255] by its own min and max: the filters' scales
    differ by several times, and one shared scale would leave most of them grey.
    Tiles are enlarged `scale` times (nearest neighbour, so pixels stay visible),
    laid out row by row, `gap` pixels of `background` between and around them.

    **Arguments:** kernel of shape (kh, kw, 3, n), Flax's HWIO; conv1 is (11, 11, 3, 64).
    **Returns:** uint8 array (rows*(kh*scale+gap)+gap, columns*(kw*scale+gap)+gap, 3),
    rows = ceil(n / columns).
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected a kernel of shape (kh, kw, 3, n), got {kernel.shape}")
    kh, kw, _, n = kernel.shape
    tiles = kernel.transpose(3, 0, 1, 2)  # (n, kh, kw, 3)
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    tiles = (tiles - low) / np.where(span > 0, span, 1)  # a constant filter becomes black, not NaN
    tiles = np.round(tiles * 255).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-n // columns)
    th, tw = kh * scale, kw * scale
    grid = np.full((rows * (th + gap) + gap, columns * (tw + gap) + gap, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        top, left = gap + (i // columns) * (th + gap), gap + (i % columns) * (tw + gap)
        grid[top : top + th, left : left + tw] = tile
    return grid


def save_conv1_filters(path: str | os.PathLike, variables: Mapping[str, Any], **grid_options: Any) -> Path:
    """Draw conv1's kernels (`features_0`, 64 of 11x11x3) as an 8x8 grid PNG at `path`, written atomically."""
    grid = filter_grid(params_of(variables)["features_0"]["kernel"], **grid_options)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
