"""Which AlexNet a Flax variable tree is for, checked by name and shape: the models' parameter layouts.

Two architectures: "torchvision" is torchvision's AlexNet (`models.alexnet.AlexNet`),
"2012" the paper's (`models.alexnet2012.AlexNet2012`). `param_shapes` gives every
parameter's path and shape; `check_variables` and `variables_architecture` compare a
tree with both and, when it is neither, name every missing, unexpected and mis-shaped
leaf against the closer one. The torch side of the same layouts (torchvision's names
and transforms) is `alexnet_jax.weights.convert`, derived from these shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from alexnet_jax.models.alexnet import CONV_LAYERS, HIDDEN, AlexNet
from alexnet_jax.models.alexnet2012 import CONV_LAYERS_2012, AlexNet2012
from alexnet_jax.models.layers import POOL_OUTPUT
from alexnet_jax.models.trees import params_of

# 256 channels in the 6x6 map that classifier_1 reads: conv5's in both architectures.
POOLED_CHANNELS = CONV_LAYERS[-1][1]
# (index, fan-in, fan-out) of the classifier's dense layers; the last one's fan-out is the head's size.
CLASSIFIER = ((1, POOLED_CHANNELS * POOL_OUTPUT * POOL_OUTPUT, HIDDEN), (4, HIDDEN, HIDDEN), (6, HIDDEN, None))


class ConversionError(ValueError):
    """A state_dict or variable tree that is not an AlexNet this package knows; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One AlexNet layout: its name, how errors call it, its linen model, its convolutions, its classifier.

    `convs`: (torch index, out channels, kernel, groups) per convolution; `classifier`:
    (index, fan-in, fan-out) per dense layer, fan-out None for the head. Both of this
    package's layouts have AlexNet's classifier (`CLASSIFIER`); a layout registered from
    outside (`archs.register_arch`) may have its own.
    """

    name: str
    description: str
    model: type[nn.Module]
    convs: tuple[tuple[int, int, int, int], ...]
    classifier: tuple[tuple[int, int, int | None], ...] = CLASSIFIER


ARCHITECTURES: dict[str, Architecture] = {
    "torchvision": Architecture(
        "torchvision", "torchvision's AlexNet", AlexNet, tuple((i, o, k, 1) for i, o, k, _, _ in CONV_LAYERS)
    ),
    "2012": Architecture(
        "2012",
        "the 2012 paper's AlexNet2012",
        AlexNet2012,
        tuple((i, o, k, g) for i, o, k, _, _, g in CONV_LAYERS_2012),
    ),
}


def get_architecture(name: str) -> Architecture:
    """The record of architecture `name` ("torchvision" or "2012"). **Raises:** ValueError for another name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def param_shapes(num_classes: int, architecture: str = "torchvision") -> dict[str, tuple[int, ...]]:
    """{"module/leaf": shape} of every parameter of `architecture`'s AlexNet, in torch's order.

    Conv kernels are HWIO, (k, k, in/groups, out); dense kernels (in, out).
    """
    layout = get_architecture(architecture)
    shapes: dict[str, tuple[int, ...]] = {}
    in_channels = 3
    for index, out, kernel, groups in layout.convs:
        shapes[f"features_{index}/kernel"] = (kernel, kernel, in_channels // groups, out)
        shapes[f"features_{index}/bias"] = (out,)
        in_channels = out
    for index, fan_in, fan_out in layout.classifier:
        fan_out = num_classes if fan_out is None else fan_out
        shapes[f"classifier_{index}/kernel"] = (fan_in, fan_out)
        shapes[f"classifier_{index}/bias"] = (fan_out,)
    return shapes


def check_shapes(
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    description: str = "torchvision's AlexNet",
) -> None:
    """Raise one ConversionError that lists every missing, unexpected and mis-shaped entry."""
    problems, _ = _problems(found, expected)
    if problems:
        raise ConversionError(f"{what} is not {description}: " + " | ".join(problems))


def _problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> tuple[list[str], int]:
    """(one text per kind of problem: missing, unexpected, mis-shaped; the number of entries at fault)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: got {tuple(found[k])}, expected {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        shown = ", ".join(unexpected[:12]) + (f", ... ({len(unexpected) - 12} more)" if len(unexpected) > 12 else "")
        problems.append(f"unexpected {len(unexpected)}: {shown}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {'; '.join(mismatched)}")
    return problems, len(missing) + len(unexpected) + len(mismatched)


def match_architecture(
    shapes: Mapping[str, tuple[int, ...]],
    expected: Callable[[str], Mapping[str, tuple[int, ...]]],
    what: str,
    architecture: str | None,
) -> str:
    """The architecture whose `expected(name)` shapes `shapes` are, or `architecture` if given and they are.

    **Raises:** ConversionError naming every problem against the closest architecture
    (torchvision's on a tie), and how far the other one is.
    """
    names = [get_architecture(architecture).name] if architecture is not None else list(ARCHITECTURES)
    results = {name: _problems(shapes, expected(name)) for name in names}
    for name, (problems, _) in results.items():
        if not problems:
            return name
    best = min(names, key=lambda name: results[name][1])  # min keeps the first of equals
    others = "".join(
        f"; nor is it {ARCHITECTURES[name].description} ({results[name][1]} entries wrong)"
        for name in names
        if name != best
    )
    raise ConversionError(f"{what} is not {ARCHITECTURES[best].description}: " + " | ".join(results[best][0]) + others)


def head_size(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int) -> int:
    """The head's size read from `shapes[key]` along `axis`; 1000 when that entry is missing or not 2-D.

    (The layout check then reports the missing or mis-shaped entry by name.)
    """
    shape = shapes.get(key)
    if shape is None or len(shape) != 2:
        return 1000
    return int(shape[axis])


def flat_params(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables (or a bare params tree) -> {"module/leaf": leaf}, leaves as given (no copies)."""
    if not isinstance(variables, Mapping):
        raise ConversionError(f"expected Flax variables (a mapping), got {type(variables).__name__}")
    params = params_of(variables)
    if not isinstance(params, Mapping):
        raise ConversionError(f"variables['params'] must be a mapping, got {type(params).__name__}")
    flat = {}
    for module, leaves in params.items():
        if isinstance(leaves, Mapping):
            for leaf, value in leaves.items():
                flat[f"{module}/{leaf}"] = value
        else:
            flat[str(module)] = leaves
    return flat


def match_variables(variables: Mapping[str, Any], architecture: str | None) -> tuple[str, int]:
    """(architecture, num_classes) of a Flax tree. **Raises:** ConversionError as `check_variables`."""
    # np.shape reads a device array's shape without copying it to the host.
    shapes = {k: np.shape(v) for k, v in flat_params(variables).items()}
    num_classes = head_size(shapes, "classifier_6/kernel", axis=1)
    found = match_architecture(shapes, lambda arch: param_shapes(num_classes, arch), "variable tree", architecture)
    return found, num_classes


def check_variables(variables: Mapping[str, Any], architecture: str | None = None) -> int:
    """Check that `variables` is an AlexNet's Flax parameter tree; return its num_classes.

    Either architecture passes unless `architecture` ("torchvision" or "2012") names one;
    `variables_architecture` says which it is.
    **Raises:** ConversionError listing every missing, unexpected or mis-shaped leaf.
    """
    return match_variables(variables, architecture)[1]


def variables_architecture(variables: Mapping[str, Any]) -> str:
    """Which AlexNet a Flax tree (`{"params": ...}` or bare) is for: "torchvision" (`AlexNet`) or "2012".

    **Raises:** ConversionError listing every problem when it is neither.
    """
    return match_variables(variables, None)[0]


def model_for(variables: Mapping[str, Any], **fields: Any) -> nn.Module:
    """The linen model that `variables` are for, with their head size: `AlexNet(...)` or `AlexNet2012(...)`.

    **Arguments:** fields, passed on to the model (dtype, dropout_rate, ...).
    **Raises:** ConversionError as `check_variables` does.
    """
    arch, num_classes = match_variables(variables, None)
    return ARCHITECTURES[arch].model(num_classes=num_classes, **fields)


def trunk_params(
    variables: Mapping[str, Any], what: str = "the AlexNet trunk (features_0..features_10)"
) -> dict[str, dict[str, Any]]:
    """The five conv layers of torchvision AlexNet variables (any head, or none), checked; the rest left out.

    What the trunk's users read (LPIPS, the trunk's export): a classifier may be there, and is
    not needed. **Returns:** {"features_0": {"kernel", "bias"}, ...}, the leaves as given.
    **Raises:** ConversionError naming every missing or mis-shaped conv leaf.
    """
    flat = flat_params(variables)
    expected = {k: v for k, v in param_shapes(1000).items() if k.startswith("features_")}
    found = {k: np.shape(v) for k, v in flat.items() if k.startswith("features_")}
    check_shapes(found, expected, what)
    trunk: dict[str, dict[str, Any]] = {}
    for key in expected:
        module, leaf = key.split("/")
        trunk.setdefault(module, {})[leaf] = flat[key]
    return trunk
