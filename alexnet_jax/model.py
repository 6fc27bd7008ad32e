"""AlexNet as torchvision ships it, in Flax linen.

torchvision's AlexNet is the "one weird trick" variant (arXiv 1404.5997), not the
2012 paper's: 64-192-384-256-256 channels, no local response normalization, no
grouped convolutions. Layers are named after torchvision's modules
(`features.0` -> `features_0`, ...) so the conversion table in `convert.py` reads
like torchvision's state_dict.

Layout is NHWC throughout. The only place where NCHW and NHWC disagree on the
numbers is the flatten before `classifier.1`; the converter permutes that weight
once, so no activation is transposed at run time.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import winograd

# (torchvision index, out channels, kernel, stride, padding). Explicit paddings, never
# 'SAME': with 'SAME', conv1 would give 56x56 at 224 instead of torchvision's 55x55.
CONV_LAYERS: tuple[tuple[int, int, int, int, int], ...] = (
    (0, 64, 11, 4, 2),
    (3, 192, 5, 1, 2),
    (6, 384, 3, 1, 1),
    (8, 256, 3, 1, 1),
    (10, 256, 3, 1, 1),
)
# Max-pools follow these conv indices (torchvision's features.2, .5 and .12).
POOL_AFTER: frozenset[int] = frozenset({0, 3, 10})
POOL_OUTPUT = 6  # AdaptiveAvgPool2d((6, 6))
HIDDEN = 4096
MIN_SIZE = 63  # smallest input side that survives the conv stack (torchvision's min_size)

# Names of the activations sown into the 'intermediates' collection: the five conv
# ReLUs (what LPIPS reads) and the fc7 embedding.
FEATURE_NAMES: tuple[str, ...] = ("relu1", "relu2", "relu3", "relu4", "relu5", "fc7")


@functools.lru_cache(maxsize=None)
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
    if h == out and w == out:
        return x
    ph = jnp.asarray(adaptive_pool_matrix(h, out), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(w, out), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x)


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

    Written over 9 strided views because XLA's own pooling is slow on CPU: reduce_window
    ~3x, and its gradient (select_and_scatter) ~8x, a tenth of a training step. The
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
    t_out = functools.reduce(
        jnp.add, (jnp.where(winner == k, tv, zero) for k, tv in enumerate(_pool_views(t)))
    )
    return best, t_out


CONV_ALGORITHMS = ("auto", "winograd", "xla")


def check_conv_algorithm(name: str) -> None:
    """Raise ValueError unless `name` is one of CONV_ALGORITHMS (the model and the training config both ask)."""
    if name not in CONV_ALGORITHMS:
        raise ValueError(f"unknown conv algorithm {name!r}; expected one of {', '.join(CONV_ALGORITHMS)}")


class Conv(nn.Module):
    """`nn.Conv` for square kernels and symmetric padding, with a choice of algorithm.

    Same parameters as `nn.Conv` ('kernel' HWIO with lecun_normal init, 'bias' zeros),
    so checkpoints and the conversion table do not care which algorithm ran.
    `algorithm`: 'xla' is `lax.conv_general_dilated`; 'winograd' computes stride-1
    layers by `winograd.conv` (faster on CPU, see there); 'auto' picks Winograd for
    stride-1 layers in float32/float64 on a CPU backend and XLA's convolution otherwise.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    algorithm: str = "auto"
    dtype: Any = None  # as nn.Conv: None computes in the promoted dtype of input and parameters
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        check_conv_algorithm(self.algorithm)
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        winograd_ok = self.stride == 1 and (
            self.algorithm == "winograd" or (self.algorithm == "auto" and winograd.use_winograd(x.dtype))
        )
        if winograd_ok:
            y = winograd.conv(x, kernel, self.padding)
        else:
            y = lax.conv_general_dilated(
                x,
                kernel,
                (self.stride, self.stride),
                ((self.padding, self.padding), (self.padding, self.padding)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + bias


class AlexNet(nn.Module):
    """torchvision.models.AlexNet in Flax.

    **Arguments** of `__call__`: x, float images of shape (N, H, W, 3) with
    H, W >= 63, normalized as torchvision does; `train` turns dropout on (needs a
    'dropout' rng). **Returns:** logits of shape (N, num_classes).

    The activations named in `FEATURE_NAMES` are sown into 'intermediates'; see
    `alexnet_jax.features` for reading them.
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5  # torchvision's default, before fc6 and fc7
    dtype: Any = jnp.float32  # computation dtype
    param_dtype: Any = jnp.float32
    conv_algorithm: str = "auto"  # see `Conv`: Winograd for conv2-conv5 on CPU, XLA's convolution elsewhere

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"AlexNet expects NHWC images of shape (N, H, W, 3), got {x.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(
                f"AlexNet needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1]}x{x.shape[2]}"
            )
        x = jnp.asarray(x, self.dtype)
        for n, (index, features, kernel, stride, pad) in enumerate(CONV_LAYERS, start=1):
            x = Conv(
                features,
                kernel,
                stride,
                pad,
                algorithm=self.conv_algorithm,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"features_{index}",
            )(x)
            x = nn.relu(x)
            self.sow("intermediates", f"relu{n}", x)
            if index in POOL_AFTER:
                x = max_pool(x)
        x = adaptive_avg_pool(x)
        # H, W, C flatten order; convert.py permutes classifier.1 from torch's C, H, W.
        x = x.reshape((x.shape[0], -1))

        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(HIDDEN, name="classifier_1")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(HIDDEN, name="classifier_4")(x))
        self.sow("intermediates", "fc7", x)
        return dense(self.num_classes, name="classifier_6")(x)
