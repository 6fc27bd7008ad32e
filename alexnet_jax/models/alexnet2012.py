"""AlexNet as the 2012 paper built it, in Flax linen: `AlexNet2012`.

Krizhevsky, Sutskever and Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks" (NIPS 2012), section 3: 96-256-384-384-256 kernels, conv2, conv4 and conv5 split
in two groups (the paper's two GPUs; conv1's kernels were split too, but each half saw the
whole image, which is a plain convolution), local response normalization after conv1 and
conv2, overlapping max-pools after conv1, conv2 and conv5, 227x227 input (the paper says
224, but 11x11 kernels at stride 4 need 227 to give its 55x55 maps). torchvision's
`AlexNet` (`models/alexnet.py`) is the 2014 "one weird trick" variant instead.

Layers are named after the torch layout the converter reads (`features.4` ->
`features_4`, see `alexnet_jax.weights.convert` and `alexnet_jax.weights.reference`), so the
conversion table stays explicit. `alexnet_jax.distributed.towers` runs the same parameters on
two devices, one group per device. Everything that computes is a function shared with the NNX
twin (`models.nnx.AlexNet2012`) and the tower-parallel forward: `local_response_norm`,
`conv_stack`, `classifier`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.models.alexnet import HIDDEN, PREPROCESS_HINT, check_num_classes
from alexnet_jax.models.layers import POOL_OUTPUT, POOL_STRIDE, POOL_WINDOW, Conv, check_float_images, max_pool
from alexnet_jax.models.trees import AcceptsBareParams

# (torch index, out channels, kernel, stride, padding, groups), the paper's section 3.5 and figure 2.
CONV_LAYERS_2012: tuple[tuple[int, int, int, int, int, int], ...] = (
    (0, 96, 11, 4, 0, 1),
    (4, 256, 5, 1, 2, 2),
    (8, 384, 3, 1, 1, 1),
    (10, 384, 3, 1, 1, 2),
    (12, 256, 3, 1, 1, 2),
)
LRN_AFTER: frozenset[int] = frozenset({0, 4})  # torch's features.2 and features.6
POOL_AFTER_2012: frozenset[int] = frozenset({0, 4, 12})  # torch's features.3, .7 and .14
INPUT_SIZE = 227
FC6_IN = POOL_OUTPUT * POOL_OUTPUT * CONV_LAYERS_2012[-1][1]  # 9216: conv5's 6x6x256, flattened H, W, C

# Section 5: "We initialized the weights in each layer from a zero-mean Gaussian distribution
# with standard deviation 0.01. We initialized the neuron biases in the second, fourth, and
# fifth convolutional layers, as well as in the fully-connected hidden layers, with the
# constant 1 [...] the neuron biases in the remaining layers with the constant 0."
INIT_STD = 0.01
BIAS_ONE: frozenset[str] = frozenset({"features_4", "features_10", "features_12", "classifier_1", "classifier_4"})
LAYER_NAMES: tuple[str, ...] = tuple(f"features_{row[0]}" for row in CONV_LAYERS_2012) + (
    "classifier_1",
    "classifier_4",
    "classifier_6",
)

# The initializations the originals used: layer -> (weight std, bias), weights zero-mean Gaussian.
# "paper": section 5, quoted above.
# "caffe": BVLC's bvlc_alexnet (models/bvlc_alexnet/train_val.prototxt): gaussian std 0.01, but
#   0.005 for fc6 and fc7; biases 0.1 where the paper has 1 ("initialization to 1 gave flat
#   loss", its readme), 0 elsewhere.
# "cuda-convnet2": Krizhevsky's own code (layers/layers-imagenet-1gpu.cfg and -2gpu-model.cfg):
#   initW 0.01 for conv1, conv2 and the fully connected layers, 0.03 for conv3-conv5; initB 1
#   for conv2, conv4, conv5 and the hidden fully connected layers, 0 (the default) elsewhere,
#   except the output layer's -7 (the 1-GPU file; the 2-GPU file leaves it 0). A bias shared by
#   every class adds the same to each logit, so under softmax -7 changes nothing but the numbers.
# All three sources fed conv1 pixels, 0-255 less the mean image (the paper, section 2: "the
# (centered) raw RGB values"), so their conv1 std is in pixel units. This package's images are
# also divided by 255 x the channel std (`transforms.preprocess.STDDEV_RGB`; a test ties the two):
# one input unit is PIXELS_PER_UNIT[c] pixel levels. conv1's kernels are drawn as the source
# gives them and converted, std x PIXELS_PER_UNIT[c] for input channel c (0.58 for the 0.01 of
# all three), so at step 0 the network computes the source's function of the image. Drawn at
# 0.01 on normalized inputs instead, conv1's responses are 57 times weaker than the source's.
PIXELS_PER_UNIT: tuple[float, float, float] = (255 * 0.229, 255 * 0.224, 255 * 0.225)
INITS: dict[str, dict[str, tuple[float, float]]] = {
    "paper": {name: (INIT_STD, 1.0 if name in BIAS_ONE else 0.0) for name in LAYER_NAMES},
    "caffe": {
        name: (0.005 if name in ("classifier_1", "classifier_4") else 0.01, 0.1 if name in BIAS_ONE else 0.0)
        for name in LAYER_NAMES
    },
    "cuda-convnet2": {
        name: (
            0.03 if name in ("features_8", "features_10", "features_12") else 0.01,
            1.0 if name in BIAS_ONE else (-7.0 if name == "classifier_6" else 0.0),
        )
        for name in LAYER_NAMES
    },
}
INIT_NAMES: tuple[str, ...] = tuple(INITS)


def check_init(init: str) -> None:
    """**Raises:** ValueError naming the known initializations when `init` is not one of them."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INIT_NAMES)}")


def kernel_init(name: str, init: str = "paper") -> Callable[..., jax.Array]:
    """The weight initializer of layer `name` under `init` (one of INITS): N(0, std^2).

    conv1's (features_0, an (11, 11, 3, 96) kernel) is N(0, (std x PIXELS_PER_UNIT[c])^2)
    for input channel c: the source's std in its pixel units, on this package's normalized inputs.
    """
    check_init(init)
    normal = nn.initializers.normal(INITS[init][name][0])
    if name != "features_0":
        return normal

    def in_pixel_units(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return (normal(key, shape, jnp.float32) * jnp.asarray(PIXELS_PER_UNIT)[:, None]).astype(dtype)

    return in_pixel_units


def bias_init(name: str, init: str = "paper") -> Callable[..., jax.Array]:
    """The bias initializer of layer `name` under `init` (one of INITS): a constant."""
    check_init(init)
    return nn.initializers.constant(INITS[init][name][1])


def replace_head(params: Mapping[str, Any], num_classes: int, *, seed: int = 0, init: str = "paper") -> dict[str, Any]:
    """AlexNet2012's `params` with classifier_6 (fc8) drawn afresh for `num_classes` outputs, as `init` draws it.

    For fine-tuning on another label set: the new head is what `AlexNet2012(num_classes,
    initialization=init)` would start with (not `models.alexnet.replace_head`'s LeCun normal),
    in the dtype of the old one, from `seed`; everything else is shared.
    **Returns:** a new params tree; classifier_6 kernel (4096, num_classes), bias (num_classes,).
    **Raises:** ValueError for an unknown `init` or fewer than one class.
    """
    check_init(init)
    check_num_classes(num_classes)
    dtype = params["classifier_6"]["kernel"].dtype
    key = jax.random.PRNGKey(seed)
    head = {
        "kernel": kernel_init("classifier_6", init)(key, (HIDDEN, num_classes), dtype),
        "bias": bias_init("classifier_6", init)(key, (num_classes,), dtype),
    }
    return {**params, "classifier_6": head}


# The paper's LRN constants (section 3.3): k = 2, n = 5, alpha = 1e-4, beta = 0.75.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def local_response_norm(
    x: jax.Array,
    *,
    size: int = LRN_SIZE,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
    k: float = LRN_K,
    halo: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The paper's local response normalization across channels (section 3.3), NHWC.

    b_i = a_i / (k + alpha * sum_j a_j^2)^beta, j over the `size` channels around i
    (i - size//2 .. i + (size-1)//2, torch's window; the paper's for odd sizes), clipped
    at the first and last channel. `alpha` is the paper's: torch's `nn.LocalResponseNorm`
    and Caffe divide their alpha by `size`. Narrow dtypes are normalized in float32.
    `halo`: the squares of the size//2 channels before x's first and the (size-1)//2
    after its last, for a tower that holds a slice of the channels (`distributed.towers`);
    None means x holds them all (zeros beyond the edges).
    **Arguments:** x (..., C). **Returns:** the same shape and dtype.
    """
    dtype = x.dtype
    if jnp.finfo(dtype).bits < 32:
        x = x.astype(jnp.float32)
    squares = jnp.square(x)
    channels = x.shape[-1]
    if halo is None:
        pad = [(0, 0)] * (x.ndim - 1) + [(size // 2, (size - 1) // 2)]
        padded = jnp.pad(squares, pad)
    else:
        padded = jnp.concatenate([halo[0].astype(x.dtype), squares, halo[1].astype(x.dtype)], axis=-1)
    window = padded[..., :channels]
    for j in range(1, size):
        window = window + padded[..., j : j + channels]
    return (x / (k + alpha * window) ** beta).astype(dtype)


def stack_sizes(size: int) -> list[int]:
    """The side of each conv ReLU output for an input side of `size`, and last that of the final pool.

    **Returns:** six ints; 55, 27, 13, 13, 13 and 6 for 227.
    """
    sizes = []
    for index, _, kernel, stride, pad, _ in CONV_LAYERS_2012:
        size = (size + 2 * pad - kernel) // stride + 1
        sizes.append(size)
        if index in POOL_AFTER_2012:
            size = (size - POOL_WINDOW) // POOL_STRIDE + 1
    return sizes + [size]


def check_input(x: jax.Array) -> None:
    """Raise ValueError unless x is NHWC RGB whose conv stack ends at 6x6.

    That is sides of 227 to 258: the strided layers' floors drop what does not fit, as
    in torch. The paper's crops are 227; 224 ends at 5x5 and is refused, never pooled to fit.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"AlexNet2012 expects NHWC images of shape (N, 227, 227, 3), got {x.shape}")
    check_float_images(x, "AlexNet2012", PREPROCESS_HINT)
    if stack_sizes(x.shape[1])[-1] != POOL_OUTPUT or stack_sizes(x.shape[2])[-1] != POOL_OUTPUT:
        raise ValueError(
            f"AlexNet2012 needs {INPUT_SIZE}x{INPUT_SIZE} inputs (its conv stack ends at "
            f"{POOL_OUTPUT}x{POOL_OUTPUT} there, and it has no adaptive pool), got {x.shape[1]}x{x.shape[2]}; "
            f"crop or resize to {INPUT_SIZE}"
        )


def conv_stack(
    convs: Sequence[Callable[[jax.Array], jax.Array]], x: jax.Array, lrn: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """conv1 .. conv5 with their ReLUs, normalizations and pools, given the five convolutions as callables.

    **Arguments:** convs, one per row of CONV_LAYERS_2012; x (N, 227, 227, 3); lrn, the
    normalization. **Returns:** (N, 6, 6, 256).
    """
    for conv, (index, *_) in zip(convs, CONV_LAYERS_2012, strict=True):
        x = jax.nn.relu(conv(x))
        if index in LRN_AFTER:
            x = lrn(x)
        if index in POOL_AFTER_2012:
            x = max_pool(x)
    return x


def classifier(
    x: jax.Array,
    fc6: Callable[[jax.Array], jax.Array],
    fc7: Callable[[jax.Array], jax.Array],
    fc8: Callable[[jax.Array], jax.Array],
    drop6: Callable[[jax.Array], jax.Array],
    drop7: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Flatten (H, W, C) -> dropout -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> fc8.

    **Arguments:** x (N, 6, 6, 256). **Returns:** logits (N, num_classes).
    """
    x = x.reshape((x.shape[0], -1))
    x = jax.nn.relu(fc6(drop6(x)))
    x = jax.nn.relu(fc7(drop7(x)))
    return fc8(x)


def dropout_masks(key: jax.Array, batch: int, rate: float) -> tuple[jax.Array, jax.Array]:
    """The keep masks of the two dropouts, before fc6 and before fc7, drawn from `key`.

    Drawn for the whole batch at once so that `distributed.towers`, which splits the batch over
    devices, applies exactly the masks of the single-device model.
    **Returns:** bool (batch, 9216) and (batch, 4096).
    """
    k6, k7 = jax.random.split(key)
    keep = 1.0 - rate
    return jax.random.bernoulli(k6, keep, (batch, FC6_IN)), jax.random.bernoulli(k7, keep, (batch, HIDDEN))


def apply_dropout(x: jax.Array, mask: jax.Array | None, rate: float) -> jax.Array:
    """torch's inverted dropout with a given keep mask: kept values scaled by 1/(1-rate); None keeps all."""
    if mask is None or rate == 0.0:
        return x
    return jnp.where(mask, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class AlexNet2012(AcceptsBareParams):
    """The 2012 paper's AlexNet in Flax linen, NHWC; 60,965,224 parameters at 1000 classes.

    conv1 96@11x11/4 -> ReLU -> LRN -> pool; conv2 256@5x5 pad 2, 2 groups -> ReLU -> LRN -> pool;
    conv3 384@3x3 pad 1; conv4 384@3x3 pad 1, 2 groups; conv5 256@3x3 pad 1, 2 groups -> pool;
    dropout -> fc6 4096 -> ReLU -> dropout -> fc7 4096 -> ReLU -> fc8 num_classes. Pools are
    3x3 at stride 2. `init` draws the initialization named by `initialization`.

    Attributes:
        num_classes: outputs of fc8 (`classifier_6`); 1000 for ImageNet.
        dropout_rate: dropout before fc6 and fc7 with `train=True` (the paper's 0.5);
            needs a 'dropout' rng then.
        dtype: the computation dtype (LRN runs in float32 under narrower ones).
        param_dtype: the dtype `init` creates parameters in.
        lrn_size, lrn_alpha, lrn_beta, lrn_k: the normalization,
            b = a / (lrn_k + lrn_alpha * sum of a^2 over lrn_size adjacent channels)^lrn_beta,
            with the paper's n = 5, alpha = 1e-4, beta = 0.75, k = 2 by default. Mind the
            convention: torch's `nn.LocalResponseNorm` and Caffe divide alpha by n, so
            the paper's alpha 1e-4 is torch's alpha=5e-4, and Caffe's bvlc_alexnet
            (alpha 1e-4, k 1 in its prototxt) is lrn_alpha=2e-5, lrn_k=1 here.
        initialization: which original's initialization `init` draws, one of INITS: "paper" (section 5:
            weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7, 0 elsewhere),
            "caffe" (bvlc_alexnet: std 0.005 for fc6 and fc7, biases 0.1 instead of 1) or
            "cuda-convnet2" (std 0.03 for conv3-conv5, fc8's bias -7). A ValueError otherwise.

    `__call__(x, train=False)`: x float images (N, 227, 227, 3) (sides up to 258 also end at
    6x6, as they would in torch; 224 and anything else is a ValueError). **Returns:** logits (N, num_classes).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lrn_size: int = LRN_SIZE
    lrn_alpha: float = LRN_ALPHA
    lrn_beta: float = LRN_BETA
    lrn_k: float = LRN_K
    # Not `init`: that is linen's method that draws the parameters.
    initialization: str = "paper"

    def setup(self) -> None:
        check_init(self.initialization)
        self.convs = [
            Conv(
                features,
                kernel,
                stride,
                pad,
                groups=groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=kernel_init(f"features_{index}", self.initialization),
                bias_init=bias_init(f"features_{index}", self.initialization),
                name=f"features_{index}",
            )
            for index, features, kernel, stride, pad, groups in CONV_LAYERS_2012
        ]
        self.fc6, self.fc7, self.fc8 = (
            nn.Dense(
                width,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=kernel_init(name, self.initialization),
                bias_init=bias_init(name, self.initialization),
                name=name,
            )
            for width, name in ((HIDDEN, "classifier_1"), (HIDDEN, "classifier_4"), (self.num_classes, "classifier_6"))
        )

    def lrn(self, x: jax.Array, halo: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """`local_response_norm` with this model's constants."""
        return local_response_norm(
            x, size=self.lrn_size, alpha=self.lrn_alpha, beta=self.lrn_beta, k=self.lrn_k, halo=halo
        )

    def dropout_masks(self, batch: int, train: bool) -> tuple[jax.Array | None, jax.Array | None]:
        """The keep masks `__call__` applies: `dropout_masks` from this module's 'dropout' rng; None off training."""
        if not train or self.dropout_rate == 0.0:
            return None, None
        return dropout_masks(self.make_rng("dropout"), batch, self.dropout_rate)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_input(x)
        mask6, mask7 = self.dropout_masks(x.shape[0], train)
        x = conv_stack(self.convs, jnp.asarray(x, self.dtype), self.lrn)
        return classifier(
            x,
            self.fc6,
            self.fc7,
            self.fc8,
            lambda h: apply_dropout(h, mask6, self.dropout_rate),
            lambda h: apply_dropout(h, mask7, self.dropout_rate),
        )
