"""AlexNet as a native Flax NNX module, computing the same numbers as the linen `AlexNet`.

The layers are the linen model's, attribute for attribute: `features_0` .. `features_10`
hold `kernel` (HWIO) and `bias`, `classifier_1`, `classifier_4` and `classifier_6` hold
`kernel` (in, out) and `bias`, so `nnx.state(model, nnx.Param)` has the names and shapes
of the linen `params` tree (and of torchvision's state_dict, through `alexnet_jax.weights.convert`).
Every number goes through the linen model's own functions (`layers.conv2d`, `layers.max_pool`,
`layers.adaptive_avg_pool`) with the same casts, so logits agree bit for bit on the same
parameters. The two dropouts are `classifier_0` and `classifier_3`, as in torchvision.

`AlexNet.from_variables` builds the module from a converted `{"params": ...}` tree without
drawing 61M random numbers first, and `to_variables` gives the tree back for
`save_variables`, `flax_to_torch` or the linen model. `train_step` and `eval_step` are the
steps of `examples/finetune_nnx.py`; `logits` is compiled inference.

`AlexNet2012` is the 2012 paper's network (`alexnet2012.AlexNet2012`) the same way: the
linen model's names (features_0, _4, _8, _10, _12; classifier_1, _4, _6), its functions
(`alexnet2012.conv_stack`, `classifier`, `local_response_norm`), its numbers bit for bit.
Loading, the head and the steps are shared between the two classes (`_Loadable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from alexnet_jax.models.alexnet import (
    CONV_LAYERS,
    HIDDEN,
    MIN_SIZE,
    POOL_AFTER,
    TRUNK_LAYERS,
    check_images,
    check_num_classes,
    trunk_depth,
)
from alexnet_jax.models.alexnet2012 import (
    CONV_LAYERS_2012,
    FC6_IN,
    LRN_ALPHA,
    LRN_BETA,
    LRN_K,
    LRN_SIZE,
    bias_init,
    check_init,
    check_input,
    classifier,
    conv_stack,
    kernel_init,
    local_response_norm,
)
from alexnet_jax.models.layers import POOL_OUTPUT, adaptive_avg_pool, check_conv_algorithm, conv2d, max_pool
from alexnet_jax.models.variables import ConversionError, check_variables

# fc6's inputs: the 6x6 pooled map of conv5's channels, flattened H, W, C.
_FC6_IN = POOL_OUTPUT * POOL_OUTPUT * CONV_LAYERS[-1][1]


_LECUN_NORMAL, _ZEROS = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()  # nn.Conv's defaults


class Conv(nnx.Module):
    """`layers.Conv` in NNX: a square-kernel convolution computed by `layers.conv2d`.

    Attributes:
        kernel: `nnx.Param` (k, k, in_features / groups, out_features), HWIO, LeCun-normal
            init unless `kernel_init` says otherwise.
        bias: `nnx.Param` (out_features,), zeros init unless `bias_init` says otherwise.
        stride, padding, groups: as `layers.conv2d` takes them (padding on every side).
        algorithm: "xla", "winograd" or "auto"; see `layers.conv2d`.
        dtype: the computation dtype; None computes in the promoted dtype of input and
            parameters, as `nn.Conv` does.

    `__call__(x)`: x (N, H, W, in_features). **Returns:** (N, H', W', out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        algorithm: str = "xla",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable[..., jax.Array] = _LECUN_NORMAL,
        bias_init: Callable[..., jax.Array] = _ZEROS,
        rngs: nnx.Rngs,
    ):
        check_conv_algorithm(algorithm)
        if in_features % groups:
            raise ValueError(f"{in_features} input channels do not split into {groups} groups")
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        key = rngs.params()
        self.kernel = nnx.Param(kernel_init(key, shape, param_dtype))
        # One key per layer from the params stream, the bias's folded from the kernel's: drawing a
        # second key would change the parameters every seed gives.
        self.bias = nnx.Param(bias_init(jax.random.fold_in(key, 1), (out_features,), param_dtype))
        self.stride, self.padding, self.groups, self.algorithm, self.dtype = stride, padding, groups, algorithm, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # The casts of linen's nn.Conv (flax.linen.dtypes.promote_dtype); nnx's takes one tuple.
        x, kernel, bias = promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return conv2d(
            x, kernel, bias, stride=self.stride, padding=self.padding, algorithm=self.algorithm, groups=self.groups
        )


class _Loadable(nnx.Module):
    """What both NNX AlexNets share: building from linen variables, the head, its check.

    A subclass sets ARCHITECTURE (a key of `variables.ARCHITECTURES`), takes
    (num_classes, *, param_dtype, rngs, **fields) in `__init__`, and defines `_new_head`.
    """

    ARCHITECTURE: ClassVar[str]
    num_classes: int

    @classmethod
    def from_variables(
        cls,
        variables: Mapping[str, Any],
        *,
        num_classes: int | None = None,
        rngs: nnx.Rngs | None = None,
        **fields: Any,
    ):
        """A model holding `variables`' parameters, built without initializing any first.

        The module is traced abstractly (`nnx.eval_shape`: no random numbers drawn) and
        its parameters are then set to the given arrays in their own dtype (which becomes
        `param_dtype`): numpy ones are put on JAX's default device, jax ones are shared,
        not copied. In eval mode, like a new model.
        **Arguments:** variables `{"params": ...}` (or the bare params tree) as
        `load_variables` or `torch_to_flax` give them, of this class's architecture, with
        any head size; num_classes, if given, must be the tree's; rngs: the dropout masks'
        keys come from its 'dropout' stream (or its default one); None means
        `nnx.Rngs(dropout=0)`; fields: the constructor's other keywords (dropout_rate,
        dtype, conv_algorithm for `AlexNet`, the lrn_* constants for `AlexNet2012`).
        **Returns:** the model, num_classes read from `classifier_6`.
        **Raises:** ConversionError when the tree is not this architecture's, ValueError for a head of another size.
        """
        tree_classes = check_variables(variables, cls.ARCHITECTURE)
        if num_classes is not None and num_classes != tree_classes:
            raise ValueError(
                f"the variables have a {tree_classes}-class head (classifier_6) but num_classes={num_classes} "
                f"was asked for; leave num_classes out, or give the variables a new head with "
                f"alexnet_jax.replace_head(variables, {num_classes})"
            )
        params = variables.get("params", variables)
        param_dtype = jnp.result_type(params["classifier_6"]["kernel"])  # numpy or jax, never copied
        model = nnx.eval_shape(
            lambda: cls(
                tree_classes,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(params=0, dropout=0),  # abstract: only the shapes are used
                **fields,
            )
        )
        state = nnx.state(model, nnx.Param)
        # jnp.asarray puts numpy arrays on the default device and shares jax arrays (immutable) as they are.
        nnx.replace_by_pure_dict(state, {m: {k: jnp.asarray(v) for k, v in p.items()} for m, p in params.items()})
        nnx.update(model, state)
        # The dropout streams' keys, concrete now (reseed sets every 'dropout' stream from one key).
        key = (rngs if rngs is not None else nnx.Rngs(dropout=0))["dropout"]()
        nnx.reseed(model, dropout=key)
        return model

    def _new_head(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
        raise NotImplementedError

    def replace_head(self, num_classes: int, *, rngs: nnx.Rngs) -> None:
        """Give the model a fresh `classifier_6` for `num_classes` outputs, initialized as the model's own head.

        For fine-tuning on another label set; everything else is kept.
        """
        check_num_classes(num_classes)
        self.classifier_6 = self._new_head(num_classes, rngs)
        self.num_classes = num_classes

    def _check_head(self) -> None:
        # A head swapped in by hand (or by nnx.update) without num_classes following it.
        outputs = self.classifier_6.bias.shape[0]
        if outputs != self.num_classes:
            raise ValueError(
                f"classifier_6 has {outputs} outputs but this model is "
                f"{type(self).__name__}(num_classes={self.num_classes}); "
                f"replace the head with model.replace_head(n, rngs=...), which keeps the two in step"
            )


class AlexNet(_Loadable):
    """torchvision.models.AlexNet as a Flax NNX module, NHWC; the linen `AlexNet`'s numbers, bit for bit.

    Attributes:
        num_classes: outputs of the last layer (`classifier_6`); 1000 for ImageNet.
            `replace_head` gives the model a fresh head of another size.
        dropout_rate: dropout before fc6 and fc7 in train mode (torchvision's 0.5).
        dtype: the computation dtype (`jnp.bfloat16` computes in bf16 with the
            parameters cast at each layer).
        param_dtype: the dtype of the parameters `__init__` creates.
        conv_algorithm: "xla" (default), "winograd" or "auto", as for the linen model;
            the parameters are the same either way.
        features_0, features_3, features_6, features_8, features_10: the five `Conv`
            layers, named after torchvision's `features.N`.
        classifier_0, classifier_3: the two `nnx.Dropout`s (torchvision's names).
        classifier_1, classifier_4, classifier_6: fc6, fc7 and the head, `nnx.Linear`.

    The model starts in eval mode (dropout off), as the linen model's `train=False`
    default: `model.train()` turns dropout on (masks drawn from the 'dropout' stream
    of the `rngs` given to `__init__`), `model.eval()` off again. Under `nnx.jit` the
    dropout streams' counters advance with the model's state, so each step draws new masks.

    `__call__(x)`: x float images (N, H, W, 3) with H, W >= 63, normalized as
    torchvision does. **Returns:** logits (N, num_classes) in the compute dtype.
    Compiled: `logits(model, x)` for inference, `train_step` for training.

    `trunk(x, layers)`: the conv ReLUs alone, as the linen `AlexNet.trunk`.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        dropout_rate: float = 0.5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        conv_algorithm: str = "xla",
        rngs: nnx.Rngs,
    ):
        check_conv_algorithm(conv_algorithm)
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.conv_algorithm = conv_algorithm
        in_features = 3
        for index, features, kernel, stride, pad in CONV_LAYERS:
            conv = Conv(
                in_features,
                features,
                kernel,
                stride=stride,
                padding=pad,
                algorithm=conv_algorithm,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            setattr(self, f"features_{index}", conv)
            in_features = features
        self.classifier_0 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_1 = nnx.Linear(_FC6_IN, HIDDEN, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier_3 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_4 = nnx.Linear(HIDDEN, HIDDEN, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classifier_6 = nnx.Linear(HIDDEN, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    ARCHITECTURE = "torchvision"

    def _new_head(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
        # LeCun-normal kernel and zero bias, as nnx.Linear and linen's head.
        return nnx.Linear(HIDDEN, num_classes, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def _relus(self, x: jax.Array, last: int) -> dict[str, jax.Array]:
        # The conv ReLUs relu1 .. relu`last`, each before its max-pool (the linen model's _relus).
        x = jnp.asarray(x, self.dtype)
        out = {}
        for n, (index, *_) in enumerate(CONV_LAYERS[:last], start=1):
            x = nnx.relu(getattr(self, f"features_{index}")(x))
            out[f"relu{n}"] = x
            if n < last and index in POOL_AFTER:
                x = max_pool(x)
        return out

    def trunk(self, x: jax.Array, layers: Sequence[str] = TRUNK_LAYERS) -> dict[str, jax.Array]:
        """The conv ReLUs named in `layers` (some of relu1..relu5), running the stack only as deep as needed.

        As the linen `AlexNet.trunk` and `alexnet_jax.trunk_features`: inputs need only
        reach the deepest layer asked for (31x31 for relu5; `trunk_min_size`).
        **Arguments:** x (N, H, W, 3) normalized images. **Returns:** {name: (N, h, w, C)}
        in the order of `layers`, in the compute dtype.
        """
        relus = self._relus(x, trunk_depth(x, layers))
        return {name: relus[name] for name in layers}

    def __call__(self, x: jax.Array) -> jax.Array:
        check_images(x, MIN_SIZE, "AlexNet")
        self._check_head()
        x = self._relus(x, len(CONV_LAYERS))[f"relu{len(CONV_LAYERS)}"]
        x = adaptive_avg_pool(max_pool(x))
        # H, W, C flatten order; the converter permutes classifier.1 from torch's C, H, W.
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.classifier_1(self.classifier_0(x)))
        x = nnx.relu(self.classifier_4(self.classifier_3(x)))
        return self.classifier_6(x)


class AlexNet2012(_Loadable):
    """The 2012 paper's AlexNet as a Flax NNX module, NHWC; the linen `AlexNet2012`'s numbers, bit for bit.

    Attributes:
        num_classes, dropout_rate, dtype, param_dtype, lrn_size, lrn_alpha, lrn_beta,
            lrn_k, initialization: as the linen `alexnet2012.AlexNet2012`'s fields (the LRN in the paper's
            convention: torch's alpha is lrn_alpha * lrn_size).
        features_0, features_4, features_8, features_10, features_12: the five `Conv`
            layers (conv2, conv4, conv5 in 2 groups), named after the torch layout's `features.N`.
        classifier_0, classifier_3: the two `nnx.Dropout`s.
        classifier_1, classifier_4, classifier_6: fc6, fc7 and fc8, `nnx.Linear`.

    `__init__` draws the initialization `initialization` names (`alexnet2012.INITS`; the
    paper's by default, as the linen module's, from the same keys). Eval mode by default, `model.train()` for
    dropout, as `AlexNet`. `__call__(x)`: x (N, 227, 227, 3) normalized images (224 is a
    ValueError). **Returns:** logits (N, num_classes) in the compute dtype.
    """

    ARCHITECTURE = "2012"

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        dropout_rate: float = 0.5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        lrn_size: int = LRN_SIZE,
        lrn_alpha: float = LRN_ALPHA,
        lrn_beta: float = LRN_BETA,
        lrn_k: float = LRN_K,
        initialization: str = "paper",
        rngs: nnx.Rngs,
    ):
        check_num_classes(num_classes)
        check_init(initialization)
        self.initialization = initialization
        self.num_classes, self.dropout_rate, self.dtype, self.param_dtype = (
            num_classes,
            dropout_rate,
            dtype,
            param_dtype,
        )
        self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k = lrn_size, lrn_alpha, lrn_beta, lrn_k
        in_features = 3
        for index, features, kernel, stride, pad, groups in CONV_LAYERS_2012:
            name = f"features_{index}"
            conv = Conv(
                in_features,
                features,
                kernel,
                stride=stride,
                padding=pad,
                groups=groups,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init(name, initialization),
                bias_init=bias_init(name, initialization),
                rngs=rngs,
            )
            setattr(self, name, conv)
            in_features = features
        self.classifier_0 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_1 = self._linear(FC6_IN, HIDDEN, "classifier_1", rngs)
        self.classifier_3 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_4 = self._linear(HIDDEN, HIDDEN, "classifier_4", rngs)
        self.classifier_6 = self._linear(HIDDEN, num_classes, "classifier_6", rngs)

    def _linear(self, fan_in: int, fan_out: int, name: str, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            fan_in,
            fan_out,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init(name, self.initialization),
            bias_init=bias_init(name, self.initialization),
            rngs=rngs,
        )

    def _new_head(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear:
        return self._linear(HIDDEN, num_classes, "classifier_6", rngs)

    def _lrn(self, x: jax.Array) -> jax.Array:
        return local_response_norm(x, size=self.lrn_size, alpha=self.lrn_alpha, beta=self.lrn_beta, k=self.lrn_k)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_input(x)
        self._check_head()
        convs = [getattr(self, f"features_{index}") for index, *_ in CONV_LAYERS_2012]
        x = conv_stack(convs, jnp.asarray(x, self.dtype), self._lrn)
        return classifier(
            x, self.classifier_1, self.classifier_4, self.classifier_6, self.classifier_0, self.classifier_3
        )


def to_variables(model: AlexNet | AlexNet2012) -> dict[str, Any]:
    """The model's parameters as linen variables `{"params": ...}`: the inverse of `from_variables`.

    For `alexnet_jax.save_variables`, `flax_to_torch` or the linen `AlexNet`. The leaves
    are the model's own jax arrays, not copies (`jax.device_get` makes numpy ones).
    **Returns:** {"params": {"features_0": {"kernel": (11, 11, 3, 64), "bias": (64,)}, ...}}.
    **Raises:** ConversionError when the model's parameters are not its architecture's.
    """
    variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    try:
        check_variables(variables, model.ARCHITECTURE)
    except ConversionError as e:
        raise ConversionError(f"to_variables: {e}") from e
    return variables


def _loss(model: AlexNet | AlexNet2012, images: jax.Array, labels: jax.Array) -> jax.Array:
    # Mean softmax cross-entropy in float32 (torch's CrossEntropyLoss), as steps.cross_entropy computes it.
    logits = model(images).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(
    model: AlexNet | AlexNet2012, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """One optimizer step on the mean cross-entropy; `model` and `optimizer` are updated in place.

    Runs in the model's mode: call `model.train()` first for dropout. The optimizer
    must be `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
    **Arguments:** images (N, H, W, 3) normalized; labels int (N,). **Returns:** the loss before the step.
    """
    loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def logits(model: AlexNet | AlexNet2012, images: jax.Array) -> jax.Array:
    """`model(images)` compiled, for inference: the model's state is read, never written back.

    `nnx.jit` returns every Variable of its arguments as an output, so `nnx.jit`ted
    inference copies all 244 MB of parameters at each call (on a CPU, more time than a
    batch-1 forward takes); here the model is split into a static graph and its
    state and the compiled function returns the logits alone (`nnx.split`, `jax.jit`,
    `nnx.merge`). In train mode dropout's counters do not advance, so every call draws
    the same masks: use `model.eval()` (or `train_step` for training).
    **Arguments:** images (N, H, W, 3) normalized. **Returns:** (N, num_classes) in the compute dtype.
    """
    graphdef, state = nnx.split(model)
    return _logits(graphdef, state, images)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


def eval_step(model: AlexNet | AlexNet2012, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Whether each image's top-1 class is its label, through `logits` (so call it in eval mode).

    **Arguments:** images (N, H, W, 3) normalized; labels int (N,). **Returns:** bool (N,).
    """
    return jnp.argmax(logits(model, images), axis=-1) == labels
