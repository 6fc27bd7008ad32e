"""AlexNet state_dicts <-> Flax variables, by an explicit name table per architecture.

Two architectures, told apart by their tensors' names and shapes (`state_dict_architecture`,
`variables_architecture`): "torchvision" is torchvision's AlexNet (`model.AlexNet`),
"2012" the paper's (`model2012.AlexNet2012`; its torch layout is `reference.py`'s
`AlexNet2012`: features.0, .4, .8, .10, .12, grouped kernels of shape (out, in/groups, k, k)).
Whichever of the two a tree is closest to names its problems when it is neither.

Every entry is (torch name, Flax path, transform). Nothing is matched by position
or reshaped to fit: a tensor of the right size in the wrong place must fail, so
both directions check the full key set and every shape, and list every problem in
one error.

The transforms, and why:
- conv: torch stores OIHW, Flax's `nn.Conv` HWIO. Grouped kernels too: both split the
  output channels into consecutive groups, so (out, in/groups, k, k) -> (k, k, in/groups, out).
- linear: torch's `nn.Linear` computes x @ W.T with W of shape (out, in); Flax's
  `nn.Dense` computes x @ K with K of shape (in, out). `classifier.4` is 4096x4096,
  where a forgotten transpose passes every shape check, which is why the parity
  tests compare logits and not only shapes.
- linear_chw: `classifier.1` reads the 256x6x6 pooled map flattened. torch flattens
  NCHW as (C, H, W); our NHWC model flattens as (H, W, C). Permuting the weight's
  input axis once here saves a transpose of the activations at every call.
- bias: copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .model import CONV_LAYERS, HIDDEN, POOL_OUTPUT, AlexNet
from .model2012 import CONV_LAYERS_2012, AlexNet2012

# 256 channels in the 6x6 map that classifier.1 reads: conv5's in both architectures.
_POOLED_CHANNELS = CONV_LAYERS[-1][1]


class ConversionError(ValueError):
    """A state_dict or variable tree that is not an AlexNet this package knows; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One AlexNet layout: its name, how errors call it, its linen model, its convolutions.

    `convs`: (torch index, out channels, kernel, groups) per convolution; the classifier
    (`classifier.1`, `.4`, `.6`) is the same in both layouts.
    """

    name: str
    description: str
    model: type[nn.Module]
    convs: tuple[tuple[int, int, int, int], ...]


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


def _linear_chw_to_flax(w: np.ndarray) -> np.ndarray:
    out = w.shape[0]
    return w.reshape(out, _POOLED_CHANNELS, POOL_OUTPUT, POOL_OUTPUT).transpose(2, 3, 1, 0).reshape(-1, out)


def _linear_chw_to_torch(k: np.ndarray) -> np.ndarray:
    out = k.shape[1]
    return k.reshape(POOL_OUTPUT, POOL_OUTPUT, _POOLED_CHANNELS, out).transpose(3, 2, 0, 1).reshape(out, -1)


# name -> (torch -> flax, flax -> torch). Each pair is a permutation, so round trips are bit-exact.
_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    "linear": (lambda w: w.T, lambda k: k.T),
    "linear_chw": (_linear_chw_to_flax, _linear_chw_to_torch),
    "bias": (lambda b: b, lambda b: b),
}


def _table(
    num_classes: int, architecture: str = "torchvision"
) -> list[tuple[str, tuple[str, str], str, tuple[int, ...]]]:
    """(torch name, flax path, transform, torch shape) for every tensor of `architecture`'s AlexNet."""
    rows = []
    in_channels = 3
    for index, out, kernel, groups in get_architecture(architecture).convs:
        module = f"features.{index}"
        shape = (out, in_channels // groups, kernel, kernel)
        rows.append((f"{module}.weight", (f"features_{index}", "kernel"), "conv", shape))
        rows.append((f"{module}.bias", (f"features_{index}", "bias"), "bias", (out,)))
        in_channels = out
    linears = (
        (1, "linear_chw", _POOLED_CHANNELS * POOL_OUTPUT * POOL_OUTPUT, HIDDEN),
        (4, "linear", HIDDEN, HIDDEN),
        (6, "linear", HIDDEN, num_classes),
    )
    for index, transform, fan_in, fan_out in linears:
        module = f"classifier.{index}"
        rows.append((f"{module}.weight", (f"classifier_{index}", "kernel"), transform, (fan_out, fan_in)))
        rows.append((f"{module}.bias", (f"classifier_{index}", "bias"), "bias", (fan_out,)))
    return rows


def _flax_shape(transform: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "conv":
        o, i, h, w = torch_shape
        return (h, w, i, o)
    if transform in ("linear", "linear_chw"):
        return torch_shape[::-1]
    return torch_shape


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """A torch tensor or array-like as a numpy array, keeping its dtype (bfloat16 via ml_dtypes)."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # torch.Tensor, without importing torch
        import torch  # already imported by whoever made the tensor

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; ml_dtypes (a jax dependency) does
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything numpy can't read is a bad entry
        raise ConversionError(f"{name}: not an array ({type(value).__name__}): {e}") from e


def _check(
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


def _match(
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


def _check_values(arrays: Mapping[str, np.ndarray], allow_nonfinite: bool) -> None:
    not_float = [f"{k} ({v.dtype})" for k, v in arrays.items() if not jnp.issubdtype(v.dtype, jnp.floating)]
    if not_float:
        raise ConversionError(f"weights must be floating point, got {', '.join(not_float)}")
    if allow_nonfinite:
        return
    bad = [
        f"{k} ({int(np.size(v) - np.isfinite(v.astype(np.float32)).sum())} values)"
        for k, v in arrays.items()
        if not np.isfinite(v.astype(np.float32)).all()
    ]
    if bad:
        raise ConversionError(
            f"non-finite weights (NaN or Inf) in {', '.join(bad)}; "
            "pass allow_nonfinite=True (--allow-nonfinite) to convert anyway"
        )


def _num_classes(shapes: Mapping[str, tuple[int, ...]], key: str, axis: int) -> int:
    shape = shapes.get(key)
    if shape is None or len(shape) != 2:
        return 1000  # the check below then reports the missing or mis-shaped entry by name
    return int(shape[axis])


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a leading `module.` (DataParallel / DistributedDataParallel) from every key that has one."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _require_mapping(state_dict: Any) -> None:
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")


def _state_dict_match(shapes: Mapping[str, tuple[int, ...]], architecture: str | None) -> tuple[str, int]:
    num_classes = _num_classes(shapes, "classifier.6.weight", axis=0)
    found = _match(
        shapes,
        lambda arch: {name: shape for name, _, _, shape in _table(num_classes, arch)},
        "state_dict",
        architecture,
    )
    return found, num_classes


def state_dict_architecture(state_dict: Mapping[str, Any]) -> str:
    """Which AlexNet a torch state_dict is: "torchvision" or "2012" (`ARCHITECTURES`), from its names and shapes.

    **Raises:** ConversionError listing every problem when it is neither.
    """
    _require_mapping(state_dict)
    return _state_dict_match({str(k): tuple(np.shape(v)) for k, v in strip_prefix(state_dict).items()}, None)[0]


def torch_to_flax(
    state_dict: Mapping[str, Any], *, allow_nonfinite: bool = False, architecture: str | None = None
) -> dict[str, Any]:
    """An AlexNet state_dict -> Flax variables `{"params": ...}` for `AlexNet` or `AlexNet2012`.

    **Arguments:** state_dict maps torch names (optionally prefixed `module.`) to torch
    tensors or numpy arrays, in torchvision's layout or the 2012 paper's (recognized
    from the tensors; `architecture` "torchvision" or "2012" insists on one);
    `num_classes` is read from `classifier.6`.
    **Returns:** a nested dict of numpy arrays, e.g. params["features_0"]["kernel"]
    of shape (11, 11, 3, 64) (torchvision) or (11, 11, 3, 96) (2012);
    `variables_architecture` tells which.
    **Raises:** ConversionError listing every missing, unexpected or mis-shaped key,
    or non-finite weights unless `allow_nonfinite`.
    """
    _require_mapping(state_dict)
    arrays = {str(k): _to_numpy(v, str(k)) for k, v in strip_prefix(state_dict).items()}
    arch, num_classes = _state_dict_match({k: v.shape for k, v in arrays.items()}, architecture)
    _check_values(arrays, allow_nonfinite)
    params: dict[str, dict[str, np.ndarray]] = {}
    for name, (module, leaf), transform, _ in _table(num_classes, arch):
        params.setdefault(module, {})[leaf] = np.ascontiguousarray(_TRANSFORMS[transform][0](arrays[name]))
    return {"params": params}


def _flat_params(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables (or a bare params tree) -> {"module/leaf": leaf}, leaves as given (no copies)."""
    if not isinstance(variables, Mapping):
        raise ConversionError(f"expected Flax variables (a mapping), got {type(variables).__name__}")
    params = variables.get("params", variables)
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


def _variables_match(variables: Mapping[str, Any], architecture: str | None) -> tuple[str, int]:
    # np.shape reads a device array's shape without copying it to the host.
    shapes = {k: np.shape(v) for k, v in _flat_params(variables).items()}
    num_classes = _num_classes(shapes, "classifier_6/kernel", axis=1)

    def expected(arch: str) -> dict[str, tuple[int, ...]]:
        return {"/".join(path): _flax_shape(t, shape) for _, path, t, shape in _table(num_classes, arch)}

    return _match(shapes, expected, "variable tree", architecture), num_classes


def check_variables(variables: Mapping[str, Any], architecture: str | None = None) -> int:
    """Check that `variables` is an AlexNet's Flax parameter tree; return its num_classes.

    Either architecture passes unless `architecture` ("torchvision" or "2012") names one;
    `variables_architecture` says which it is.
    **Raises:** ConversionError listing every missing, unexpected or mis-shaped leaf.
    """
    return _variables_match(variables, architecture)[1]


def variables_architecture(variables: Mapping[str, Any]) -> str:
    """Which AlexNet a Flax tree (`{"params": ...}` or bare) is for: "torchvision" (`AlexNet`) or "2012".

    **Raises:** ConversionError listing every problem when it is neither.
    """
    return _variables_match(variables, None)[0]


def model_for(variables: Mapping[str, Any], **fields: Any) -> nn.Module:
    """The linen model that `variables` are for, with their head size: `AlexNet(...)` or `AlexNet2012(...)`.

    **Arguments:** fields, passed on to the model (dtype, dropout_rate, ...).
    **Raises:** ConversionError as `check_variables` does.
    """
    arch, num_classes = _variables_match(variables, None)
    return ARCHITECTURES[arch].model(num_classes=num_classes, **fields)


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables of either architecture -> the torch state_dict of numpy arrays.

    `torchvision.models.AlexNet(num_classes).load_state_dict({k: torch.from_numpy(v)})`
    accepts a "torchvision" result, `reference.AlexNet2012` a "2012" one.
    **Raises:** ConversionError as `check_variables` does.
    """
    arch, num_classes = _variables_match(variables, None)
    flat = _flat_params(variables)
    # Fresh writable copies: torch.from_numpy warns on (and must not alias) read-only jax buffers.
    return {
        name: np.array(_TRANSFORMS[transform][1](np.asarray(flat["/".join(path)])), order="C", copy=True)
        for name, path, transform, _ in _table(num_classes, arch)
    }
