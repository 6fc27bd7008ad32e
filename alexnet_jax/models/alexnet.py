"""AlexNet as torchvision ships it, in Flax linen.

torchvision's AlexNet is the "one weird trick" variant (arXiv 1404.5997), not the
2012 paper's: 64-192-384-256-256 channels, no local response normalization, no
grouped convolutions. Layers are named after torchvision's modules
(`features.0` -> `features_0`, ...) so the conversion table (`alexnet_jax.weights.convert`)
reads like torchvision's state_dict.

Layout is NHWC throughout. The only place where NCHW and NHWC disagree on the
numbers is the flatten before `classifier.1`; the converter permutes that weight
once, so no activation is transposed at run time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.models.layers import (
    POOL_STRIDE,
    POOL_WINDOW,
    Conv,
    adaptive_avg_pool,
    check_conv_algorithm,
    check_float_images,
    check_sides,
    max_pool,
)
from alexnet_jax.models.trees import AcceptsBareParams, is_bare_params, params_of

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
HIDDEN = 4096
MIN_SIZE = 63  # smallest input side that survives the conv stack (torchvision's min_size)

# The five conv ReLUs (what LPIPS reads), each before its max-pool, and the activations
# sown into the 'intermediates' collection: those and the fc7 embedding.
TRUNK_LAYERS: tuple[str, ...] = ("relu1", "relu2", "relu3", "relu4", "relu5")
FEATURE_NAMES: tuple[str, ...] = TRUNK_LAYERS + ("fc7",)


def trunk_sizes(size: int, last: int = len(CONV_LAYERS)) -> list[int]:
    """The side of each conv ReLU output (relu1 .. relu`last`) for an input side of `size`.

    A side below 1 means the stack cannot get that far. **Returns:** `last` ints.
    """
    sizes = []
    for n, (index, _, kernel, stride, pad) in enumerate(CONV_LAYERS[:last], start=1):
        size = (size + 2 * pad - kernel) // stride + 1
        sizes.append(size)
        if n < last and index in POOL_AFTER:
            size = (size - POOL_WINDOW) // POOL_STRIDE + 1
    return sizes


def trunk_min_size(last: int = len(CONV_LAYERS)) -> int:
    """The smallest input side for which the conv stack reaches relu`last`: 7, 15, 31, 31, 31 for relu1..relu5."""
    size = 1
    while min(trunk_sizes(size, last)) < 1:
        size += 1
    return size


def _layer_index(name: str) -> int:
    if name not in TRUNK_LAYERS:
        raise ValueError(f"unknown trunk layer {name!r}; expected some of {', '.join(TRUNK_LAYERS)}")
    return TRUNK_LAYERS.index(name) + 1


def trunk_depth(x: jax.Array, layers: Sequence[str]) -> int:
    """The deepest of `layers` (relu1..relu5) as 1..5, after checking the names and that `x` reaches it.

    The trunk of both the linen and the NNX model runs only this deep.
    **Raises:** ValueError for no layers, an unknown name, or images too small for the deepest layer.
    """
    if not layers:
        raise ValueError(f"no trunk layers asked for; choose some of {', '.join(TRUNK_LAYERS)}")
    last = max(_layer_index(name) for name in layers)
    check_images(x, trunk_min_size(last), f"AlexNet's conv stack up to relu{last}")
    return last


# What to pass instead of integer pixels: the classifier and the trunk compute on normalized floats.
PREPROCESS_HINT = (
    "alexnet_jax.preprocess(image) (resize, crop, /255, ImageNet mean and std), or your own normalized floats"
)


def check_images(x: jax.Array, min_size: int, what: str) -> None:
    """Raise unless `x` is float NHWC RGB with sides of at least `min_size` (symbolic sides with constraints too).

    **Raises:** TypeError for integer images (raw pixels would give wrong numbers without a
    word); ValueError for another layout or smaller sides.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"AlexNet expects NHWC images of shape (N, H, W, 3), got {x.shape}")
    check_float_images(x, what, PREPROCESS_HINT)
    check_sides(x, min_size, what)


class AlexNet(AcceptsBareParams):
    """torchvision.models.AlexNet in Flax linen, NHWC.

    Attributes:
        num_classes: outputs of the last layer (`classifier_6`); 1000 for ImageNet.
            Variables with another head size are refused with an error naming both;
            `replace_head` gives a model a fresh head of any size.
        dropout_rate: dropout before fc6 and fc7 when called with `train=True`
            (torchvision's default 0.5); needs a 'dropout' rng then.
        dtype: the computation dtype (`jnp.bfloat16` computes in bf16 with the
            parameters cast at each layer).
        param_dtype: the dtype `init` creates parameters in.
        conv_algorithm: "xla" (default) is XLA's convolution: compiles in seconds on
            every backend and under every sharding. "winograd" computes conv2-conv5 by
            Winograd's algorithm: faster steps on a CPU, seconds more to compile; "auto"
            takes it on a CPU in float32/float64 only. Same parameters either way.

    `__call__(x, train=False)`: x float images (N, H, W, 3) with H, W >= 63,
    normalized as torchvision does. **Returns:** logits (N, num_classes). It sows the
    activations named in `FEATURE_NAMES` into 'intermediates' (see `alexnet_jax.features`).

    `trunk(x, layers)`: the conv ReLUs alone, for features inside jit and grad; see
    `alexnet_jax.trunk_features`.
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv_algorithm: str = "xla"

    def setup(self) -> None:
        check_conv_algorithm(self.conv_algorithm)
        self.convs = [
            Conv(
                features,
                kernel,
                stride,
                pad,
                algorithm=self.conv_algorithm,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"features_{index}",
            )
            for index, features, kernel, stride, pad in CONV_LAYERS
        ]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc6, self.fc7 = dense(HIDDEN, name="classifier_1"), dense(HIDDEN, name="classifier_4")
        self.head = dense(self.num_classes, name="classifier_6")
        # Dropout_0 and Dropout_1, the names nn.compact gives: a submodule's rng is folded with its
        # path, so these names decide which masks a 'dropout' key draws.
        self.dropouts = [nn.Dropout(self.dropout_rate, name=f"Dropout_{i}") for i in range(2)]

    def _relus(self, x: jax.Array, last: int) -> dict[str, jax.Array]:
        # The conv ReLUs relu1 .. relu`last`, each before its max-pool.
        x = jnp.asarray(x, self.dtype)
        out = {}
        for n, (conv, (index, *_)) in enumerate(zip(self.convs[:last], CONV_LAYERS), start=1):
            x = nn.relu(conv(x))
            out[f"relu{n}"] = x
            if n < last and index in POOL_AFTER:
                x = max_pool(x)
        return out

    def trunk(self, x: jax.Array, layers: Sequence[str] = TRUNK_LAYERS) -> dict[str, jax.Array]:
        """The conv ReLUs named in `layers` (some of relu1..relu5), running the stack only as deep as needed.

        The classifier does not run, so its parameters need not be there and its
        63-pixel minimum does not apply: inputs need only reach the deepest layer
        asked for (31x31 for relu5; `trunk_min_size`).
        **Arguments:** x (N, H, W, 3) normalized images. **Returns:** {name: (N, h, w, C)}
        in the order of `layers`, in the compute dtype.
        """
        relus = self._relus(x, trunk_depth(x, layers))
        return {name: relus[name] for name in layers}

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_images(x, MIN_SIZE, "AlexNet")
        self._check_head()
        relus = self._relus(x, len(CONV_LAYERS))
        for name, value in relus.items():
            self.sow("intermediates", name, value)
        x = adaptive_avg_pool(max_pool(relus[f"relu{len(CONV_LAYERS)}"]))
        # H, W, C flatten order; the converter permutes classifier.1 from torch's C, H, W.
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.fc6(self.dropouts[0](x, deterministic=not train)))
        x = nn.relu(self.fc7(self.dropouts[1](x, deterministic=not train)))
        self.sow("intermediates", "fc7", x)
        return self.head(x)

    def _check_head(self) -> None:
        # Flax would say only "ScopeParamShapeError" for a head of another size; say which sizes.
        if self.is_initializing() or not self.has_variable("params", "classifier_6"):
            return
        head = self.variables["params"]["classifier_6"].get("bias")
        if head is not None and head.shape != (self.num_classes,):
            raise ValueError(
                f"the variables have a {head.shape[0]}-class head (classifier_6) but this model is "
                f"AlexNet(num_classes={self.num_classes}); build AlexNet(num_classes={head.shape[0]}) "
                f"(alexnet_jax.load_model does), or give the variables a new head with alexnet_jax.replace_head"
            )


def trunk_features(
    variables: Mapping[str, Any],
    x: jax.Array,
    layers: Sequence[str] = TRUNK_LAYERS,
    *,
    dtype: Any = jnp.float32,
    conv_algorithm: str = "xla",
) -> dict[str, jax.Array]:
    """AlexNet's conv ReLUs as a pure function of (variables, images): use it inside `jit`, `grad`, `vmap`.

    Only the five conv layers' parameters are read (variables with any head, or
    none, work). **Arguments:** variables `{"params": ...}` or the bare params tree; x (N, H, W, 3)
    normalized images, at least `trunk_min_size` of the deepest layer (31 for
    relu5); layers, some of relu1..relu5. **Returns:** {name: (N, h, w, C)} in
    `layers`' order, in `dtype`: at 224x224, relu1 (N, 55, 55, 64), relu2 (N, 27, 27, 192),
    relu3 (N, 13, 13, 384), relu4 and relu5 (N, 13, 13, 256).
    """
    model = AlexNet(dtype=dtype, conv_algorithm=conv_algorithm)
    return model.apply({"params": params_of(variables)}, x, tuple(layers), method=AlexNet.trunk)


def check_num_classes(num_classes: int) -> None:
    """**Raises:** ValueError for a head of fewer than one output (every model and head swap checks this)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")


def replace_head(variables: Mapping[str, Any], num_classes: int, *, seed: int = 0) -> dict[str, Any]:
    """`variables` (or a bare params tree) with classifier_6 drawn afresh for `num_classes` outputs.

    For fine-tuning on another label set without initializing the whole network: the
    new head has the initializers AlexNet's own head has (LeCun-normal kernel, zero
    bias) in the dtype of the old one, drawn from `seed`; everything else is shared.
    **Returns:** a new tree of the same form; classifier_6 kernel (4096, num_classes), bias (num_classes,).
    """
    check_num_classes(num_classes)
    if not is_bare_params(variables):
        return {**variables, "params": replace_head(variables["params"], num_classes, seed=seed)}
    kernel = variables["classifier_6"]["kernel"]
    head = nn.Dense(num_classes, param_dtype=kernel.dtype).init(
        jax.random.PRNGKey(seed), jnp.zeros((1, HIDDEN), kernel.dtype)
    )["params"]
    return {**variables, "classifier_6": head}
