"""One call from variables to an artifact file in either format: what `alexnet-jax export` runs.

export_file(load_variables("alexnet.msgpack"), "alexnet.onnx", "onnx")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alexnet_jax import lpips
from alexnet_jax.export.onnx_graph import ONNX_TARGETS, onnx_model, require_onnx, save_onnx
from alexnet_jax.export.stablehlo import DEFAULT_SIZE, ExportError, export_model, require_flatbuffers, save_exported
from alexnet_jax.models.alexnet import TRUNK_LAYERS

FORMATS = ("stablehlo", "onnx")


def check_request(fmt: str, target: str, platforms: Sequence[str], embed_weights: bool) -> None:
    """**Raises:** ExportError for a format, or a format's option, that cannot be had (before any work)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        if target not in ONNX_TARGETS:
            raise ExportError(
                f"ONNX export makes one of {', '.join(ONNX_TARGETS)}, not {target!r}; LPIPS exports as stablehlo"
            )
        if tuple(platforms) != ("cpu",) or not embed_weights:
            raise ExportError("platforms and weights as an argument are stablehlo options; an ONNX model runs anywhere")


def require_format(fmt: str) -> None:
    """**Raises:** ExportError when the package `fmt` needs (the `export` extra) is missing: said before any work."""
    if fmt == "onnx":
        require_onnx()
    else:
        require_flatbuffers()


def export_file(
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    fmt: str,
    target: str = "classifier",
    *,
    platforms: Sequence[str] = ("cpu",),
    size: int | None = None,
    layers: Sequence[str] = TRUNK_LAYERS,
    lpips_version: str = lpips.DEFAULT_VERSION,
    embed_weights: bool = True,
) -> Path:
    """Write `target` of `variables` to `path` as `fmt`: "stablehlo" (`export_model`) or "onnx" (`onnx_model`).

    **Arguments:** size None for dynamic height and width, or one fixed side; the rest as
    those functions take them. **Returns:** the path. **Raises:** ExportError (a ValueError)
    saying what cannot be exported and why.
    """
    check_request(fmt, target, platforms, embed_weights)
    require_format(fmt)
    shape = {"dynamic_size": size is None, "size": DEFAULT_SIZE if size is None else size}
    if fmt == "onnx":
        return save_onnx(path, onnx_model(variables, target, layers=layers, **shape))
    exported = export_model(
        variables,
        target,
        platforms=platforms,
        embed_weights=embed_weights,
        layers=layers,
        lpips_version=lpips_version,
        **shape,
    )
    return save_exported(path, exported)
