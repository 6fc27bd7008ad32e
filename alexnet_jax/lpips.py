"""LPIPS (Zhang et al., CVPR 2018) with AlexNet's trunk: the `lpips` package's numbers, in JAX.

    from alexnet_jax import load_variables, lpips
    params = lpips.load(load_variables("alexnet.msgpack"))     # version "0.1", lpips's default
    d = lpips.distance(params, x0, x1)                         # (N,); x0, x1 NHWC in [-1, 1]
    loss, g = jax.value_and_grad(lambda x: lpips.distance(params, x, target).mean())(x)

What `lpips.LPIPS(net="alex")` computes (lpips 0.1.4, lpips/lpips.py), and so this module:
1. `normalize=True` takes images in [0, 1] to [-1, 1]: 2x - 1.
2. v0.1 shifts and scales each channel (lpips's ScalingLayer: (x - shift) / scale, the
   ImageNet mean and std moved to [-1, 1]). v0.0 fed the [-1, 1] images to the trunk
   unscaled, the bug its docstring names; here that is shift 0 and scale 1, the identity
   to the bit.
3. torchvision AlexNet's relu1..relu5, each before its max-pool, for both images
   (`trunk_features`: no classifier, so inputs down to 31x31 work).
4. Each position's feature vector divided by its norm over channels + 1e-10.
5. The squared difference, summed over channels with the layer's learned non-negative
   weights (lpips's 1x1 convolution without bias; its dropout is off outside training).
6. The mean over the layer's positions, or with `spatial=True` the layer's map upsampled
   to the input's size (bilinear, align_corners=False, torch's rule to the index); the
   five layers summed in order.

The trunk weights are torchvision's ImageNet weights, converted by `alexnet-jax convert`
(lpips builds `torchvision.models.alexnet(pretrained=True)`). The linear weights ship in
`assets/lpips/`, copied from lpips 0.1.4's wheel (BSD-2-Clause, see `assets/lpips/README.md`).
Neither torch nor lpips is needed at run time. The bottom of this module reads and pairs
image files for `alexnet-jax lpips`.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax import lax

from alexnet_jax.files import atomic_write_bytes, check_output_file
from alexnet_jax.inference.predict import DEFAULT_BATCH_SIZE, padded_size
from alexnet_jax.models.alexnet import CONV_LAYERS, TRUNK_LAYERS, trunk_features, trunk_min_size
from alexnet_jax.models.layers import check_float_images, check_sides
from alexnet_jax.models.variables import trunk_params
from alexnet_jax.transforms.images import ImageReadError, is_image_name, load_image
from alexnet_jax.transforms.preprocess import to_model_mode, to_unit_float

VERSIONS = ("0.0", "0.1")
DEFAULT_VERSION = "0.1"  # lpips's default, and what papers mean by "LPIPS (AlexNet)"
# lpips's ScalingLayer for v0.1, as lpips rounds them: (2 * ImageNet mean - 1, 2 * std).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor's: keeps an all-zero feature vector at zero
MIN_SIZE = trunk_min_size()  # 31: the smallest side that reaches relu5
CHANNELS = tuple(out for _, out, *_ in CONV_LAYERS)  # 64, 192, 384, 256, 256
# lpips's state_dict names for the five linear layers, and their (1, C, 1, 1) shapes.
LIN_NAMES = tuple(f"lin{k}.model.1.weight" for k in range(len(TRUNK_LAYERS)))
LIN_SHAPES = {name: (1, c, 1, 1) for name, c in zip(LIN_NAMES, CHANNELS, strict=True)}
# torchvision's features.N -> lpips's `net.slice<k>` that holds it (lpips/pretrained_networks.py).
TORCH_SLICES = {index: k for k, (index, *_) in enumerate(CONV_LAYERS, start=1)}


def check_lin_weights(arrays: Mapping[str, Any], what: str) -> None:
    """Raise ValueError unless `arrays` are exactly lpips's five AlexNet linear weights, float32, finite."""
    shapes = {name: tuple(np.shape(value)) for name, value in arrays.items()}
    problems = [f"missing {name}" for name in LIN_NAMES if name not in shapes]
    problems += [f"unexpected {name}" for name in shapes if name not in LIN_SHAPES]
    problems += [
        f"{name}: got {shapes[name]}, expected {shape}"
        for name, shape in LIN_SHAPES.items()
        if name in shapes and shapes[name] != shape
    ]
    problems += [
        f"{name}: {np.asarray(value).dtype}, not float32 and finite"
        for name, value in arrays.items()
        if np.asarray(value).dtype != np.float32 or not np.isfinite(value).all()
    ]
    if problems:
        raise ValueError(f"{what} is not lpips's AlexNet linear weights: {'; '.join(problems)}")


@functools.cache
def lin_weights(version: str = DEFAULT_VERSION) -> dict[str, np.ndarray]:
    """lpips's linear weights for `version`, as its state_dict names and shapes them.

    **Returns:** {"lin0.model.1.weight": (1, 64, 1, 1), ..., "lin4.model.1.weight": (1, 256, 1, 1)}, float32.
    """
    _check_version(version)
    name = f"alex_v{version}.msgpack"
    data = (resources.files("alexnet_jax") / "assets" / "lpips" / name).read_bytes()
    arrays = serialization.msgpack_restore(data)
    check_lin_weights(arrays, f"alexnet_jax/assets/lpips/{name}")
    for array in arrays.values():
        array.setflags(write=False)  # cached and shared: nobody may change them in place
    return arrays


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown LPIPS version {version!r}; expected one of {', '.join(VERSIONS)}")


def load(variables: Mapping[str, Any], version: str = DEFAULT_VERSION) -> dict[str, Any]:
    """LPIPS parameters: AlexNet's five conv layers and lpips's linear weights for `version`.

    **Arguments:** variables `{"params": ...}` (or the bare tree) holding
    `features_{0,3,6,8,10}`, e.g. `load_variables` of a converted torchvision
    checkpoint; a classifier may be there and is left out. version "0.1" (lpips's
    default) or "0.0".
    **Returns:** a tree of device arrays: "trunk" (the conv kernels and biases as
    given), "lin" {"lin0": (64,), "lin1": (192,), "lin2": (384,), "lin3": (256,),
    "lin4": (256,)}, "shift" and "scale" (3,), all that `distance` reads.
    **Raises:** ValueError for an unknown version; ConversionError (a ValueError)
    listing every missing or mis-shaped conv leaf.
    """
    _check_version(version)
    trunk = trunk_params(variables, "the LPIPS trunk (AlexNet's features_0..features_10)")
    weights = lin_weights(version)
    lin = {f"lin{k}": weights[name].reshape(-1) for k, name in enumerate(LIN_NAMES)}
    shift, scale = (SHIFT, SCALE) if version == "0.1" else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    params = {
        "trunk": trunk,
        "lin": lin,
        "shift": np.asarray(shift, np.float32),
        "scale": np.asarray(scale, np.float32),
    }
    # Once here: host arrays would be copied to the device again at every call.
    return jax.device_put(params)


@functools.cache
def upsample_matrix(size: int, out: int) -> np.ndarray:
    """torch's bilinear weights along one axis (`nn.Upsample(size=..., align_corners=False)`).

    Output i reads input src = (size/out) * (i + 0.5) - 0.5, clamped at 0, between
    floor(src) and the next index (the last one repeats), weighted by distance; the
    arithmetic is float32, as torch's CPU kernel does it, so the indices and weights
    are torch's. lpips only upsamples (every map is smaller than the input), where
    `jax.image.resize(..., "bilinear")` agrees to float32 rounding; for downsampling it
    would antialias and this would not. **Returns:** float32 (out, size); the identity when size == out.
    """
    if size == out:
        return np.eye(out, dtype=np.float32)
    f32 = np.float32
    scale = f32(size) / f32(out)
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        src = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0))
        i0 = min(int(np.floor(src)), size - 1)
        lam1 = min(max(src - f32(i0), f32(0)), f32(1))
        i1 = i0 + (1 if i0 < size - 1 else 0)
        m[i, i0] += f32(1) - lam1
        m[i, i1] += lam1
    return m


def upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, h, w) maps to (N, H, W) by torch's bilinear rule (align_corners=False): two small static matmuls."""
    mh = jnp.asarray(upsample_matrix(x.shape[1], size[0]), x.dtype)
    mw = jnp.asarray(upsample_matrix(x.shape[2], size[1]), x.dtype)
    # HIGHEST: GPUs and TPUs would otherwise round these matmuls' inputs to bf16 or TF32.
    return jnp.einsum("ih,nhw,jw->nij", mh, x, mw, precision=lax.Precision.HIGHEST)


INPUT_HINT = "x / 127.5 - 1 for 8-bit pixels (in [-1, 1]), or x / 255 with normalize=True"
# How far outside [-1, 1] (or [0, 1] with normalize=True) a value may lie: resampling overshoots
# a little, which is harmless; 0-255 pixels, or [0, 1] images given as [-1, 1] ones, are not.
RANGE_SLACK = 0.05


def _check_pair(x0: jax.Array, x1: jax.Array) -> None:
    if x0.shape != x1.shape:
        raise ValueError(f"LPIPS compares images of one shape; got {x0.shape} and {x1.shape}")
    if x0.ndim != 4 or x0.shape[-1] != 3:
        raise ValueError(f"LPIPS expects NHWC images of shape (N, H, W, 3), got {x0.shape}")
    for x in (x0, x1):
        check_float_images(x, "LPIPS", INPUT_HINT)
    check_sides(x0, MIN_SIZE, "LPIPS with AlexNet", " (to reach relu5)")


def check_range(x: Any, normalize: bool = False) -> None:
    """Raise ValueError when concrete images lie outside LPIPS's range: [-1, 1], or [0, 1] with `normalize`.

    Values inside `jit`, `grad` or `vmap` are tracers, unknown until the program runs, and
    are not checked (a check there would cost a callback to the host at every step);
    `distance` checks its arguments before it traces them. **Raises:** ValueError naming
    the range found and what to pass.
    """
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        return  # traced, or not an array: integer ones are refused in one line by _check_pair
    if np.size(x) == 0:
        return
    low, high = (0.0, 1.0) if normalize else (-1.0, 1.0)
    lo, hi = (float(v) for v in (x.min(), x.max()))
    if lo < low - RANGE_SLACK or hi > high + RANGE_SLACK or not (np.isfinite(lo) and np.isfinite(hi)):
        mode = "with normalize=True takes images in [0, 1]" if normalize else "takes images in [-1, 1]"
        raise ValueError(f"LPIPS {mode}, got values in [{lo:.4g}, {hi:.4g}]; pass {INPUT_HINT}")


def layer_maps(
    params: Mapping[str, Any],
    x0: jax.Array,
    x1: jax.Array,
    *,
    normalize: bool = False,
    dtype: Any = jnp.float32,
    conv_algorithm: str = "xla",
) -> list[jax.Array]:
    """Each layer's distance map before averaging: lpips's `lins[k](diffs[k])`, squeezed.

    **Arguments:** as `distance`. **Returns:** five arrays (N, h_k, w_k), relu1 to
    relu5, in float32 (float64 for a float64 `dtype`).
    """
    _check_pair(x0, x1)
    # The head (scaling, unit vectors, differences, weights) stays in float32 with a bf16 trunk: it is cheap,
    # and its squared differences of nearly equal unit vectors are where bf16 would lose the most.
    head = jnp.promote_types(dtype, jnp.float32)

    def unit_features(x: jax.Array) -> list[jax.Array]:
        x = jnp.asarray(x, head)
        if normalize:
            x = 2 * x - 1
        x = (x - params["shift"].astype(head)) / params["scale"].astype(head)
        features = trunk_features(
            {"params": params["trunk"]}, x, TRUNK_LAYERS, dtype=dtype, conv_algorithm=conv_algorithm
        )
        out = []
        for name in TRUNK_LAYERS:
            f = features[name].astype(head)
            out.append(f / (jnp.sqrt(jnp.sum(f**2, axis=-1, keepdims=True)) + EPS))
        return out

    # Two trunk calls, as lpips makes, not one on both batches: a loss's gradient then reaches
    # x0 alone, and XLA drops the other image's backward pass (conv1's input gradient is the dearest).
    maps = []
    for k, (u0, u1) in enumerate(zip(unit_features(x0), unit_features(x1), strict=True)):
        # Elementwise and summed, not a matmul: full float32 on every backend.
        maps.append(jnp.sum((u0 - u1) ** 2 * params["lin"][f"lin{k}"].astype(head), axis=-1))
    return maps


def distance(
    params: Mapping[str, Any],
    x0: jax.Array,
    x1: jax.Array,
    *,
    spatial: bool = False,
    normalize: bool = False,
    dtype: Any = jnp.float32,
    conv_algorithm: str = "xla",
) -> jax.Array:
    """LPIPS between image pairs, as `lpips.LPIPS(net="alex", version=...)(x0, x1)` computes it.

    A pure function of (params, x0, x1), compiled once per shape: use it under `jit`, `vmap` (over
    pairs: a leading axis on x0 and x1) and `grad` (as a loss; gradients reach the
    images and `params`).
    **Arguments:** params from `load`; x0, x1 float NHWC images (N, H, W, 3) of one
    shape, H, W >= 31, in [-1, 1] (or [0, 1] with `normalize=True`); `spatial` returns
    the map instead of its mean; `dtype` the trunk's compute dtype: `jnp.bfloat16`
    runs the convolutions in bf16 with float32 parameters cast at each layer, the rest
    stays float32 (tests/test_lpips.py bounds bf16 distances at 3% of float32's);
    `conv_algorithm` as `AlexNet`'s ("auto" takes Winograd on a CPU: faster, longer to compile).
    **Returns:** float32 (N,), or (N, H, W) with `spatial=True`, whose mean over
    H, W is close to (not exactly) the distance, as in lpips. For identical images it
    is ~1e-16 where lpips gives 0: XLA fuses the normalization into the difference and
    rounds the two sides apart, though their features are equal to the bit.
    **Raises:** TypeError for integer images; ValueError for other shapes, or for concrete
    (untraced) images outside the range by more than `RANGE_SLACK` (`check_range`).
    """
    for x in (x0, x1):
        check_range(x, normalize)
    return _distance(params, x0, x1, spatial=spatial, normalize=normalize, dtype=dtype, conv_algorithm=conv_algorithm)


@functools.partial(jax.jit, static_argnames=("spatial", "normalize", "dtype", "conv_algorithm"))
def _distance(
    params: Mapping[str, Any],
    x0: jax.Array,
    x1: jax.Array,
    *,
    spatial: bool,
    normalize: bool,
    dtype: Any,
    conv_algorithm: str,
) -> jax.Array:
    maps = layer_maps(params, x0, x1, normalize=normalize, dtype=dtype, conv_algorithm=conv_algorithm)
    size = x0.shape[1:3]
    # lpips adds the layers one by one to 0 (0 + a is exact), so this is its order too.
    total = 0
    for m in maps:
        total = total + (upsample(m, size) if spatial else jnp.mean(m, axis=(1, 2)))
    return total


# Files: what `alexnet-jax lpips` runs, importable and tested.

RESULT_COLUMNS = ("path0", "path1", "distance", "error")


@dataclass(frozen=True)
class PairResult:
    """The outcome for one pair of files: a distance, or the reason there is none."""

    path0: Path
    path1: Path
    distance: float | None = None
    error: str | None = None


def torch_reference(state_dict: Mapping[str, Any], version: str = DEFAULT_VERSION):
    """The lpips package's `LPIPS(net="alex")` with torchvision AlexNet's `state_dict` as its trunk, in eval mode.

    What the tests and `benchmarks/lpips_benchmark.py` compare against; needs torch and lpips
    (a test dependency), and torchvision importable, which lpips imports. Linear weights are
    lpips's own for `version`. **Returns:** the torch module, `model(x0, x1)` on NCHW tensors.
    """
    import warnings

    import lpips as lpips_package

    _check_version(version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision: 'pretrained' is deprecated
        model = lpips_package.LPIPS(net="alex", version=version, pnet_rand=True, verbose=False)
    trunk = {}
    for name, value in state_dict.items():
        if name.startswith("features."):
            _, index, rest = name.split(".", 2)
            trunk[f"slice{TORCH_SLICES[int(index)]}.{index}.{rest}"] = value
    model.net.load_state_dict(trunk, strict=True)
    return model.eval()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as lpips's own scripts feed it: (H, W, 3) float32 in [-1, 1].

    8-bit images (and every mode PIL converts to RGB: alpha dropped, grey repeated,
    palettes expanded) become `rgb / 127.5 - 1` in float64 rounded to float32,
    exactly `lpips.im2tensor`; PNG decodes to the same pixels here as in the OpenCV
    reader of lpips's scripts. 16-bit and float grayscale keep their precision (/65535,
    or taken to be in [0, 1]; `transforms.preprocess.to_model_mode`), where OpenCV would cut them to 8 bits.
    **Raises:** ImageReadError with a one-line reason.
    """
    image = load_image(path)
    try:
        array = np.asarray(to_model_mode(image))
    except Exception as e:  # noqa: BLE001 - a decoded image PIL cannot convert
        raise ImageReadError(f"cannot convert to RGB ({type(e).__name__}: {e})") from None
    if array.dtype == np.uint8:
        return (array / 127.5 - 1.0).astype(np.float32)
    x = 2 * to_unit_float(array) - 1
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def find_pairs(dir0: str | os.PathLike, dir1: str | os.PathLike) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """Same-named image files in two folders, as lpips's `lpips_2dirs.py` pairs them (no recursion).

    Visible files with an image suffix (`transforms.images.is_image_name`), as folder walks take them.
    **Returns:** (pairs (dir0/name, dir1/name) sorted by name, files found in only one folder).
    **Raises:** ValueError naming a folder that is missing or cannot be listed.
    """
    dir0, dir1 = Path(dir0), Path(dir1)

    def names(folder: Path) -> set[str]:
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
        try:
            return {p.name for p in folder.iterdir() if is_image_name(p) and p.is_file()}
        except OSError as e:
            raise ValueError(f"{folder}: cannot list the folder ({e.strerror or e})") from None

    names0, names1 = names(dir0), names(dir1)
    pairs = [(dir0 / name, dir1 / name) for name in sorted(names0 & names1)]
    alone = sorted([dir0 / name for name in names0 - names1] + [dir1 / name for name in names1 - names0])
    return pairs, alone


def _read_pair(path0: Path, path1: Path) -> tuple[np.ndarray, np.ndarray]:
    images = []
    for path in (path0, path1):
        try:
            images.append(read_image(path))
        except ImageReadError as e:
            raise ImageReadError(f"{path}: {e}") from None
    x0, x1 = images
    if x0.shape != x1.shape:
        raise ImageReadError(
            f"different sizes: {x0.shape[1]}x{x0.shape[0]} and {x1.shape[1]}x{x1.shape[0]} (width x height)"
        )
    if min(x0.shape[:2]) < MIN_SIZE:
        raise ImageReadError(f"{x0.shape[1]}x{x0.shape[0]} is smaller than LPIPS's {MIN_SIZE}x{MIN_SIZE} minimum")
    return x0, x1


def distance_files(
    params: Mapping[str, Any],
    pairs: Sequence[tuple[Path, Path]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Any = jnp.float32,
    conv_algorithm: str = "xla",
) -> Iterator[PairResult]:
    """LPIPS for file pairs, `batch_size` pairs at a time; one `PairResult` per pair, in order.

    Pairs of one size go through `distance` together, zero-padded to the next power
    of two (at most `batch_size`), so a folder compiles a few shapes per image size
    and memory stays flat. A pair with an unreadable file, two sizes, or a side
    under 31 pixels yields an `error` and takes no place in the batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        results: dict[int, PairResult] = {}
        by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for i, (path0, path1) in enumerate(chunk):
            try:
                x0, x1 = _read_pair(path0, path1)
            except ImageReadError as e:
                results[i] = PairResult(path0, path1, error=str(e))
                continue
            by_shape.setdefault(x0.shape, []).append((i, x0, x1))
        for group in by_shape.values():
            n = len(group)
            x0, x1 = (np.stack([item[j] for item in group]) for j in (1, 2))
            padding = padded_size(n, batch_size) - n
            if padding:
                x0, x1 = (np.concatenate([x, np.zeros((padding, *x.shape[1:]), x.dtype)]) for x in (x0, x1))
            values = np.asarray(distance(params, x0, x1, dtype=dtype, conv_algorithm=conv_algorithm))
            for (i, _, _), value in zip(group, values[:n], strict=True):
                results[i] = PairResult(*chunk[i], distance=float(value))
        yield from (results[i] for i in range(len(chunk)))


def check_output_path(path: str | os.PathLike) -> Path:
    """Check before a run that results can be written to `path` (a file is created and removed in its folder).

    **Raises:** ValueError saying why not.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: results are written as .csv; got suffix {path.suffix or '(none)'!r}")
    return check_output_file(path)


def write_results(path: str | os.PathLike, results: Sequence[PairResult]) -> Path:
    """Write results atomically as CSV: path0, path1, distance (9 digits, float32's), error; one row per pair."""
    path = check_output_path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    for r in results:
        writer.writerow([r.path0, r.path1, "" if r.distance is None else f"{r.distance:.9g}", r.error or ""])
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


def format_result(result: PairResult) -> str:
    """One line for a person: `name: distance` (the file name when both share it) or `name: reason`."""
    p0, p1 = result.path0, result.path1
    name = p0.name if p0.name == p1.name else f"{p0} {p1}"
    return f"{name}: {result.error if result.error is not None else f'{result.distance:.7g}'}"
