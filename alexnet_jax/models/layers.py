"""The layers both AlexNets share, written to compute exactly what torch's do.

`conv2d` / `Conv` (a choice of convolution algorithm, torch's `groups`), `max_pool`
(torch's `MaxPool2d(3, 2)` with torch's gradient) and `adaptive_avg_pool` (torch's
`AdaptiveAvgPool2d`), on NHWC arrays. The linen models, the NNX models and the
two-tower layout all compute through these functions, so they agree bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.errors import InconclusiveDimensionOperation

from alexnet_jax.models import winograd

POOL_OUTPUT = 6  # torchvision's AdaptiveAvgPool2d((6, 6))


def check_float_images(x: jax.Array, what: str, instead: str) -> None:
    """Refuse integer images in one line: `what` computes on normalized floats, and raw 0-255 pixels would
    give wrong numbers without a word. `instead` says what to pass (e.g. "alexnet_jax.preprocess(image)").
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{what} takes float images, got {jnp.dtype(dtype).name}; pass {instead}")


def check_sides(x: jax.Array, min_size: int, what: str, why: str = "") -> None:
    """Raise ValueError unless H and W of an NHWC `x` are at least `min_size`; `why` is said after the size.

    Works on symbolic shapes (`jax.export.symbolic_shape`) too: there the sides must carry
    constraints that decide the comparison ("h >= 63"), or the error says which to add.
    """
    h, w = x.shape[1:3]
    try:
        small = h < min_size or w < min_size
    except InconclusiveDimensionOperation:
        raise ValueError(
            f"{what} needs inputs of at least {min_size}x{min_size}{why}; the symbolic sides {h}x{w} may be smaller: "
            f'give them constraints, e.g. jax.export.symbolic_shape("b, h, w", constraints=("h >= {min_size}", '
            f'"w >= {min_size}"))'
        ) from None
    if small:
        raise ValueError(f"{what} needs inputs of at least {min_size}x{min_size}{why}, got {h}x{w}")


@functools.cache
def adaptive_pool_matrix(size: int, out: int = POOL_OUTPUT) -> np.ndarray:
    """Averaging weights of torch's `AdaptiveAvgPool` along one axis.

    Window i covers [floor(i*size/out), ceil((i+1)*size/out)); windows overlap when
    `size` is not a multiple of `out`, and repeat when `size < out`.

    **Returns:** float32 array of shape (out, size); row i holds 1/len on window i.
    """
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start = (i * size) // out
        end = -((-(i + 1) * size) // out)  # ceil without floats
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jnp.ndarray, out: int = POOL_OUTPUT) -> jnp.ndarray:
    """torch's `AdaptiveAvgPool2d((out, out))` on NHWC input.

    The 2-D window average is separable, so it is two small matmuls with static
    weights; when the input is already out x out (224 and 227 inputs) it is the identity,
    as in torch.

    **Arguments:** x of shape (N, H, W, C). **Returns:** (N, out, out, C).
    """
    _, h, w, _ = x.shape
    if h == out and w == out:  # False for symbolic sides, which the matrices then cover
        return x
    return jnp.einsum("ih,jw,nhwc->nijc", _pool_weights(h, out, x.dtype), _pool_weights(w, out, x.dtype), x)


def _pool_weights(size: Any, out: int, dtype: Any) -> jax.Array:
    """`adaptive_pool_matrix(size, out)` in `dtype`; for a symbolic `size` (jax.export) built from jnp ops.

    Same windows and the same float32 weights as the numpy matrix, so an exported
    program computes what `apply` does at every size.
    """
    if isinstance(size, int | np.integer):
        return jnp.asarray(adaptive_pool_matrix(int(size), out), dtype)
    i = jnp.arange(out)
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    columns = jnp.arange(size)
    inside = (columns >= start[:, None]) & (columns < end[:, None])
    weight = jnp.float32(1) / (end - start).astype(jnp.float32)
    return jnp.where(inside, weight[:, None], jnp.float32(0)).astype(dtype)


POOL_WINDOW, POOL_STRIDE = 3, 2  # torchvision's MaxPool2d(kernel_size=3, stride=2), no padding


def _pool_views(x: jnp.ndarray) -> list[jnp.ndarray]:
    """The 9 strided views whose elementwise max is the pool, in torch's scan order (row, then column)."""
    _, h, w, _ = x.shape
    oh, ow = (h - POOL_WINDOW) // POOL_STRIDE + 1, (w - POOL_WINDOW) // POOL_STRIDE + 1
    return [
        x[:, i : i + POOL_STRIDE * (oh - 1) + 1 : POOL_STRIDE, j : j + POOL_STRIDE * (ow - 1) + 1 : POOL_STRIDE]
        for i in range(POOL_WINDOW)
        for j in range(POOL_WINDOW)
    ]


@jax.custom_jvp
def max_pool(x: jnp.ndarray) -> jnp.ndarray:
    """torch's `MaxPool2d(3, stride=2)` on NHWC input, with torch's gradient.

    Written over 9 strided views because XLA's own pooling is slow on CPU (reduce_window,
    and above all its gradient, select_and_scatter, a visible part of a training step). The
    forward is the elementwise max of the views (bit-identical to reduce_window). The
    derivative is defined in forward mode, taking each output's tangent from the first
    maximum of its window in row-major order, as torch's backward does; JAX transposes
    it into slices and pads for reverse mode, and both `jvp` and `grad` work.

    **Arguments:** x (N, H, W, C). **Returns:** (N, (H-3)//2+1, (W-3)//2+1, C).
    """
    return functools.reduce(jnp.maximum, _pool_views(x))


@max_pool.defjvp
def _max_pool_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    views = _pool_views(x)
    best, winner = views[0], jnp.zeros(views[0].shape, jnp.int8)
    for k, view in enumerate(views[1:], start=1):
        later = view > best  # strict: ties stay with the earlier position, as in torch
        best, winner = jnp.where(later, view, best), jnp.where(later, jnp.int8(k), winner)
    zero = jnp.zeros((), t.dtype)
    t_out = functools.reduce(jnp.add, (jnp.where(winner == k, tv, zero) for k, tv in enumerate(_pool_views(t))))
    return best, t_out


CONV_ALGORITHMS = ("xla", "winograd", "auto")


def check_conv_algorithm(name: str) -> None:
    """Raise ValueError unless `name` is one of CONV_ALGORITHMS (the model and the training config both ask)."""
    if name not in CONV_ALGORITHMS:
        raise ValueError(f"unknown conv algorithm {name!r}; expected one of {', '.join(CONV_ALGORITHMS)}")


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    stride: int = 1,
    padding: int = 0,
    algorithm: str = "xla",
    groups: int = 1,
) -> jax.Array:
    """One convolution layer as `nn.Conv` computes it, NHWC input and HWIO kernel, plus bias.

    `algorithm`: "xla" is `lax.conv_general_dilated`; "winograd" computes stride-1
    layers by `winograd.conv` (faster on a CPU, slower to compile; see there); "auto"
    takes Winograd for stride-1 layers in float32/float64 on a CPU backend. The linen
    and NNX models both call this, so they compute the same numbers.
    `groups` > 1 is torch's `groups` (XLA's `feature_group_count`): output channels
    [g*C_out/groups, (g+1)*C_out/groups) read input channels [g*C_in/groups, ...) only.
    Winograd is for ungrouped layers: "winograd" refuses them, "auto" leaves them to XLA.
    **Arguments:** x (N, H, W, C_in), kernel (k, k, C_in/groups, C_out), bias (C_out,), one dtype.
    **Returns:** (N, H', W', C_out).
    """
    check_conv_algorithm(algorithm)
    if groups < 1 or x.shape[-1] != kernel.shape[2] * groups or kernel.shape[3] % groups:
        raise ValueError(
            f"a convolution in {groups} groups needs a kernel of shape (k, k, {x.shape[-1]}/{groups}, "
            f"a multiple of {groups}) for {x.shape[-1]} input channels, got {kernel.shape}"
        )
    if groups > 1 and algorithm == "winograd":
        raise ValueError(
            f"conv_algorithm 'winograd' computes ungrouped convolutions only, not one in {groups} groups; "
            "use 'xla' or 'auto' (which leaves grouped layers to XLA)"
        )
    use_winograd = (
        stride == 1
        and groups == 1
        and (algorithm == "winograd" or (algorithm == "auto" and winograd.use_winograd(x.dtype)))
    )
    if use_winograd:
        y = winograd.conv(x, kernel, padding)
    else:
        y = lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
    return y + bias


class Conv(nn.Module):
    """`nn.Conv` for square kernels and symmetric padding, computed by `conv2d` with a choice of algorithm.

    Same parameters as `nn.Conv` ('kernel' HWIO with lecun_normal init, 'bias' zeros,
    unless other initializers are given; kernel (k, k, C_in/groups, features) with
    `groups`), so checkpoints and the conversion table do not care which algorithm ran.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    algorithm: str = "xla"
    dtype: Any = None  # as nn.Conv: None computes in the promoted dtype of input and parameters
    param_dtype: Any = jnp.float32
    groups: int = 1
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(
            x, kernel, bias, stride=self.stride, padding=self.padding, algorithm=self.algorithm, groups=self.groups
        )
