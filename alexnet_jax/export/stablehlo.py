"""AlexNet, its trunk or LPIPS as a serialized `jax.export` artifact: StableHLO that runs without this package.

    exported = export_model(variables, "classifier", platforms=("cpu", "cuda"))
    save_exported("alexnet.jax_exported", exported)
    # in another process, with jax alone:
    exported = jax.export.deserialize(open("alexnet.jax_exported", "rb").read())
    logits = exported.call(images)                     # (N, H, W, 3) float32, any N, H, W >= 63

The batch is symbolic, and so are height and width unless `dynamic_size=False` (then
`size` x `size`): the classifier takes sides of 63 and more, the trunk and LPIPS 31 and
more (`models.alexnet.trunk_min_size`), as `apply` does; the adaptive pool is built for
the size at run time (`models.layers._pool_weights`), so every size computes what `apply`
computes. The weights are constants in the artifact (one self-contained file, about the
size of the weights), or with `embed_weights=False` its first argument, a tree of the same
structure as the variables given (a small file; the weights travel separately).
Serializing needs `flatbuffers` (the `export` extra).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import lpips
from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.models.alexnet import MIN_SIZE, TRUNK_LAYERS, AlexNet, trunk_features, trunk_min_size
from alexnet_jax.models.trees import params_of
from alexnet_jax.models.variables import match_variables, trunk_params

TARGETS = ("classifier", "trunk", "lpips")
PLATFORMS = ("cpu", "cuda", "tpu")
DEFAULT_SIZE = 224  # the side of a fixed-size export (dynamic_size=False)


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why and what to do instead."""


def check_target(target: str, platforms: Sequence[str]) -> None:
    """**Raises:** ExportError for an unknown target, no platform, or an unknown platform."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; expected one of {', '.join(TARGETS)}")
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ExportError(f"platforms must be some of {', '.join(PLATFORMS)}, got {', '.join(platforms) or 'none'}")


def min_size(target: str, layers: Sequence[str] = TRUNK_LAYERS) -> int:
    """The smallest side `target` takes: 63 for the classifier, the deepest layer's (31 for relu5) otherwise."""
    if target == "classifier":
        return MIN_SIZE
    deepest = max(TRUNK_LAYERS.index(name) + 1 for name in layers) if target == "trunk" else len(TRUNK_LAYERS)
    return trunk_min_size(deepest)


def image_spec(target: str, *, dynamic_size: bool = True, size: int = DEFAULT_SIZE, layers=TRUNK_LAYERS):
    """The images' `jax.ShapeDtypeStruct`: (b, h, w, 3) float32 with h, w >= `min_size(target)`, or (b, size, size, 3).

    **Raises:** ExportError for a fixed `size` below the target's minimum.
    """
    smallest = min_size(target, layers)
    if dynamic_size:
        b, h, w = jax.export.symbolic_shape("b, h, w", constraints=(f"h >= {smallest}", f"w >= {smallest}"))
        return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
    if size < smallest:
        raise ExportError(f"the {target} takes sides of at least {smallest}, got size {size}")
    (b,) = jax.export.symbolic_shape("b")
    return jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)


def _computation(
    variables: Mapping[str, Any], target: str, layers: Sequence[str], lpips_version: str, dtype: Any
) -> tuple[Callable[..., Any], Any, int]:
    """(fn(weights, *images), the weights tree fn takes, how many image arguments)."""
    if target == "lpips":
        weights = lpips.load(variables, lpips_version)
        return (lambda p, x0, x1: lpips.distance(p, x0, x1, dtype=dtype)), weights, 2
    if target == "trunk":
        # The conv layers alone, checked as LPIPS checks them: a classifier may be there or not.
        weights = {"params": trunk_params(variables)}
        names = tuple(layers)
        return (lambda p, x: trunk_features(p, x, names, dtype=dtype)), weights, 1
    arch, num_classes = match_variables(variables, None)
    if arch != "torchvision":
        raise ExportError(
            f"export takes torchvision's AlexNet; these variables are the {arch} architecture's "
            "(its model runs in JAX: alexnet_jax.model_for)"
        )
    weights = {"params": params_of(variables)}
    model = AlexNet(num_classes=num_classes, dtype=dtype)
    return (lambda p, x: model.apply(p, x).astype(jnp.float32)), weights, 1


def export_model(
    variables: Mapping[str, Any],
    target: str = "classifier",
    *,
    platforms: Sequence[str] = ("cpu",),
    dynamic_size: bool = True,
    size: int = DEFAULT_SIZE,
    embed_weights: bool = True,
    layers: Sequence[str] = TRUNK_LAYERS,
    lpips_version: str = lpips.DEFAULT_VERSION,
    dtype: Any = jnp.float32,
) -> jax.export.Exported:
    """`target` of torchvision AlexNet `variables` as a `jax.export.Exported` for `platforms`.

    **Arguments:** variables `{"params": ...}` or the bare tree (any head size; the trunk
    and LPIPS read the conv layers only); target "classifier" (logits, float32 (N, num_classes)),
    "trunk" (`trunk_features` of `layers`: {name: (N, h, w, C)}) or "lpips" (`lpips.distance`
    of two image batches of one shape, (N,)); platforms, some of cpu, cuda, tpu (lowered here
    for each, no such device needed); dynamic_size, symbolic height and width (else `size`);
    embed_weights, the weights as constants (else the first argument); dtype, the compute dtype.
    **Returns:** the `Exported`; `.call(*images)` (or `.call(weights, *images)`) runs it.
    **Raises:** ExportError for a target, platform, size or architecture it cannot export;
    ConversionError for variables that are not AlexNet's.
    """
    check_target(target, tuple(platforms))
    image = image_spec(target, dynamic_size=dynamic_size, size=size, layers=layers)
    fn, weights, n_images = _computation(variables, target, layers, lpips_version, dtype)
    images = [image] * n_images
    weights = jax.device_put(weights)
    if embed_weights:
        # The barrier keeps XLA from constant-folding the 244 MB of weights (a transpose of fc6's
        # kernel) when the artifact is compiled: minutes of folding and a log of alarms otherwise.
        program = jax.jit(lambda *x: fn(lax.optimization_barrier(weights), *x))
        return jax.export.export(program, platforms=tuple(platforms))(*images)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weights)
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(abstract, *images)


def require_flatbuffers() -> None:
    """**Raises:** ExportError saying how to install flatbuffers, which `jax.export` serializes with."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"serializing a jax.export artifact needs flatbuffers ({e}); "
            "install it with: pip install 'alexnet-jax[export]'"
        ) from None


def serialize(exported: jax.export.Exported) -> bytes:
    """The artifact's bytes (`jax.export.deserialize` reads them). **Raises:** ExportError without flatbuffers."""
    require_flatbuffers()
    return bytes(exported.serialize())


def save_exported(path: str | os.PathLike, exported: jax.export.Exported) -> Path:
    """Write `exported` serialized to `path`, atomically. **Returns:** the path."""
    path = Path(path)
    atomic_write_bytes(path, serialize(exported))
    return path


def load_exported(path: str | os.PathLike) -> jax.export.Exported:
    """An artifact written by `save_exported`. **Raises:** ExportError naming the file when it is not one."""
    data = Path(path).read_bytes()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - flatbuffers raises several types for bytes that are not an artifact
        raise ExportError(f"{path}: not a jax.export artifact ({type(e).__name__})") from None
