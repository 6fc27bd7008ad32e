"""Image -> top-k ImageNet labels, and image -> features, with one compiled forward per batch shape.

    from alexnet_jax import load_variables, predict
    variables = load_variables("alexnet.msgpack")
    predict(variables, [Image.open("cat.jpg")])[0].labels   # ('tabby', 'tiger cat', ...)

Variables of the paper's `AlexNet2012` (or `arch="2012"`) run with its preprocessing
(the centre 227 crop of the 256x256 image); `crops=10` averages the softmax over
TenCrop's ten crops (either arch; see `alexnet_jax.transforms.augment`).

Images are run in chunks of `batch_size`. A chunk that is not full is padded with
zeros to the next power of two (at most `batch_size`), so a folder of any size
compiles at most ceil(log2(batch_size)) + 1 shapes, and a second call never compiles
again; the padded rows are dropped from the results. The compiled functions are
cached per (num_classes, dtype), not per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from alexnet_jax.archs import get_arch
from alexnet_jax.inference.labels import class_names
from alexnet_jax.inference.verify import ParityReport, compare_logits, top_k
from alexnet_jax.models.alexnet import FEATURE_NAMES, AlexNet
from alexnet_jax.models.trees import params_of
from alexnet_jax.models.variables import check_variables, variables_architecture
from alexnet_jax.steps import crop_averaged_logits
from alexnet_jax.transforms.augment import EVAL_CROPS

DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 5

ImageLike = Image.Image | np.ndarray
Images = np.ndarray | Iterable[ImageLike]


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    indices: tuple[int, ...]
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    def __str__(self) -> str:
        return "; ".join(f"{label} {p:.3f}" for label, p in zip(self.labels, self.probabilities))


def padded_size(n: int, batch_size: int) -> int:
    """The batch a chunk of `n` images (1 <= n <= batch_size) is padded to: the next power of two, at most that."""
    return min(batch_size, 1 << (n - 1).bit_length())


def _as_model_input(images: Images, arch: str = "torchvision", crops: int = 1) -> np.ndarray:
    """A float (N, H, W, 3) array ((N, crops, H, W, 3) for crops > 1) is taken as already preprocessed;
    anything else is preprocessed image by image, as `arch` evaluates.
    """
    if crops not in EVAL_CROPS:
        raise ValueError(f"crops must be one of {', '.join(map(str, EVAL_CROPS))}, got {crops}")
    rank = 4 if crops == 1 else 5
    if isinstance(images, np.ndarray | jax.Array) and images.ndim >= 4 and jnp.issubdtype(images.dtype, jnp.floating):
        if images.ndim != rank or images.shape[-1] != 3 or (crops > 1 and images.shape[1] != crops):
            layout = "(N, H, W, 3)" if crops == 1 else f"(N, {crops}, H, W, 3)"
            raise ValueError(f"preprocessed images must be NHWC {layout}, got shape {images.shape}")
        return np.asarray(images, np.float32)
    check_batch(images)
    spec = get_arch(arch)  # "torchvision" at one crop: `preprocess`, torchvision's transforms bit for bit
    arrays = [spec.eval_transform(image, spec.image_size, crops) for image in images]
    if not arrays:
        return np.zeros((0, *((crops,) if crops > 1 else ()), spec.image_size, spec.image_size, 3), np.float32)
    return np.stack(arrays)


def check_batch(images: Any) -> None:
    """Refuse one image given where a batch is expected: a PIL image, or an (H, W), (H, W, 3) or (H, W, 4) array.

    Iterating one image array would take each of its rows for an image: a (256, 385, 3)
    photo would be classified as 256 "images". A 3-D array whose last axis is not 3 or 4
    is N greyscale images, and (N, H, W, 3) a batch. **Raises:** TypeError saying how to wrap it.
    """
    if isinstance(images, Image.Image):
        raise TypeError("expected a batch of images (a list), got one PIL image; wrap it in a list")
    if isinstance(images, np.ndarray | jax.Array) and (
        images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4))
    ):
        raise TypeError(
            f"expected a batch of images (a list, or an (N, H, W, 3) array), got one image array of shape "
            f"{images.shape}; wrap it in a list, or add a batch axis (image[None])"
        )


@functools.cache
def _compiled_logits(num_classes: int, dtype: str, arch: str = "torchvision") -> Callable:
    model = get_arch(arch).model(num_classes, dtype=jnp.dtype(dtype))

    def logits(variables, x):
        # Softmax and the caller's comparisons want float32 even when the compute is bfloat16.
        return model.apply(variables, x).astype(jnp.float32)

    return jax.jit(logits)


@functools.cache
def _compiled_features(num_classes: int, dtype: str) -> Callable:
    model = AlexNet(num_classes=num_classes, dtype=jnp.dtype(dtype))

    def features(variables, x):
        _, state = model.apply(variables, x, mutable=["intermediates"])
        # sow() stores a tuple per name (one entry per call of the layer); AlexNet calls each once.
        return {name: state["intermediates"][name][0].astype(jnp.float32) for name in FEATURE_NAMES}

    return jax.jit(features)


def _run_in_chunks(fn: Callable, variables: Mapping[str, Any], x: np.ndarray, batch_size: int) -> Any:
    """`fn(variables, chunk)` over x in padded chunks; the outputs' padded rows dropped, chunks concatenated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        n = len(chunk)
        padding = padded_size(n, batch_size) - n
        if padding:
            # numpy, not jnp: an eager jnp.pad would itself compile for every new n.
            chunk = np.concatenate([chunk, np.zeros((padding, *chunk.shape[1:]), chunk.dtype)])
        # Slice in numpy: slicing the device array would compile a slice for every new n.
        outputs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(variables, chunk)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _params_only(variables: Mapping[str, Any], arch: str = "torchvision") -> tuple[dict[str, Any], int]:
    # Only 'params': a stale 'intermediates' collection passed back in would be appended to by sow().
    num_classes = check_variables(variables, arch)
    params = params_of(variables)  # check_variables accepts a bare tree too
    return {"params": jax.device_put(params)}, num_classes


def predict_logits(
    variables: Mapping[str, Any],
    images: Images,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Any = jnp.float32,
    arch: str | None = None,
    crops: int = 1,
) -> np.ndarray:
    """AlexNet's logits for a batch of images.

    **Arguments:** variables `{"params": ...}` (numpy or device arrays; float32 for
    the bfloat16 compute too; when calling many times, `jax.device_put` them once,
    or each call copies them to the device again); images, a list of PIL images / uint8 arrays of any
    size (preprocessed as `arch` evaluates: torchvision's transforms, or the paper's
    centre crop for "2012") or a float array (N, H, W, 3) that is already preprocessed;
    dtype, the compute dtype (`jnp.bfloat16` computes in bfloat16 with the float32
    parameters cast at each layer); arch, a key of `archs.ARCHS` (None: the one the
    variables are for, `alexnet_jax.variables_architecture`); crops, 1 or 10 (the
    softmax averaged over TenCrop's crops; preprocessed input is then (N, 10, H, W, 3)).
    **Returns:** float32 array (N, num_classes); with crops=10 the log of the averaged
    softmax (`steps.crop_averaged_logits`), whose softmax is that average.
    """
    check_batch(images)  # before the variables go to the device
    arch = variables_architecture(variables) if arch is None else arch
    params, num_classes = _params_only(variables, arch)
    x = _as_model_input(images, arch, crops)
    if len(x) == 0:
        return np.zeros((0, num_classes), np.float32)
    fn = _compiled_logits(num_classes, jnp.dtype(dtype).name, arch)
    if crops == 1:
        return _run_in_chunks(fn, params, x, batch_size)
    # The crops of an image stay in one chunk: chunks of batch_size images.
    logits = _run_in_chunks(fn, params, x.reshape((-1, *x.shape[2:])), batch_size * crops)
    return np.asarray(crop_averaged_logits(jnp.asarray(logits), crops))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, returned as float32. **Returns:** same shape as `logits`."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def predictions_from_logits(logits: np.ndarray, k: int = DEFAULT_TOP_K) -> list[Prediction]:
    """Top-k `Prediction`s from (N, num_classes) logits; labels are ImageNet's for 1000 classes."""
    logits = np.asarray(logits)
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and the number of classes ({num_classes}), got {k}")
    names = class_names(num_classes)
    probabilities = softmax(logits)
    return [
        Prediction(
            indices=tuple(int(i) for i in row),
            labels=tuple(names[i] for i in row),
            probabilities=tuple(float(p) for p in probs[row]),
        )
        for row, probs in zip(top_k(logits, k), probabilities)
    ]


def predict(
    variables: Mapping[str, Any],
    images: Images,
    *,
    k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Any = jnp.float32,
    arch: str | None = None,
    crops: int = 1,
) -> list[Prediction]:
    """Top-k labels and probabilities for each image, as `predict_logits` takes them.

    **Returns:** one `Prediction` per image, in order: `indices`, `labels` and
    `probabilities` (softmax over all classes, averaged over the crops with crops=10),
    each a k-tuple, most probable first.
    """
    logits = predict_logits(variables, images, batch_size=batch_size, dtype=dtype, arch=arch, crops=crops)
    return predictions_from_logits(logits, k)


def features(
    variables: Mapping[str, Any],
    images: Images,
    *,
    layers: Sequence[str] = FEATURE_NAMES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Any = jnp.float32,
) -> dict[str, np.ndarray]:
    """Activations of AlexNet for images on the host, from the same parameters and model as the logits.

    For features inside `jit` or `grad` (a loss), use the pure `alexnet_jax.trunk_features`.
    **Arguments:** as `predict_logits`; layers, some of `FEATURE_NAMES`.
    **Returns:** float32 NHWC arrays by name, in the order of `layers`; at 224x224 input:
    relu1 (N, 55, 55, 64), relu2 (N, 27, 27, 192), relu3 (N, 13, 13, 384),
    relu4 (N, 13, 13, 256), relu5 (N, 13, 13, 256) -- the five conv ReLUs, before
    any max-pool, which LPIPS reads -- and fc7 (N, 4096), the ReLU after
    `classifier.4`, the usual image embedding.
    """
    unknown = [name for name in layers if name not in FEATURE_NAMES]
    if unknown or not layers:
        raise ValueError(
            f"unknown feature layers {unknown or '(none asked for)'}; choose from {', '.join(FEATURE_NAMES)}"
        )
    check_batch(images)
    params, num_classes = _params_only(variables)
    x = _as_model_input(images)
    fn = _compiled_features(num_classes, jnp.dtype(dtype).name)
    if len(x) == 0:
        shapes = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        return {name: np.zeros((0, *shapes[name].shape[1:]), np.float32) for name in layers}
    out = _run_in_chunks(fn, params, x, batch_size)
    return {name: out[name] for name in layers}  # jax.tree.map sorted the keys; keep the order asked for


@dataclass(frozen=True)
class DtypeAgreement:
    """How a lower-precision compute dtype agrees with float32 on the same images."""

    dtype: str
    logits: ParityReport  # float32 as the reference
    max_abs_probability_diff: float

    def summary(self) -> str:
        r, n = self.logits, self.logits.num_images
        return (
            f"{self.dtype} vs float32 on {n} images: top-1 agree {r.top1_agree}/{n}, "
            f"same top-5 set {r.top5_same_set}/{n}, largest |probability difference| "
            f"{self.max_abs_probability_diff:.3g}, largest |logit difference| {r.max_abs_diff:.3g} "
            f"(largest |logit| {r.max_abs_logit:.3g})"
        )


def dtype_agreement(
    variables: Mapping[str, Any],
    images: Images,
    *,
    dtype: Any = jnp.bfloat16,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> DtypeAgreement:
    """Compare `dtype` compute (float32 parameters) with float32 compute on `images`."""
    x = _as_model_input(images)
    if len(x) == 0:
        raise ValueError("dtype_agreement needs at least one image")
    reference = predict_logits(variables, x, batch_size=batch_size)
    ours = predict_logits(variables, x, batch_size=batch_size, dtype=dtype)
    return DtypeAgreement(
        dtype=jnp.dtype(dtype).name,
        logits=compare_logits(reference, ours, reference_name="float32"),
        max_abs_probability_diff=float(np.abs(softmax(reference) - softmax(ours)).max()),
    )
