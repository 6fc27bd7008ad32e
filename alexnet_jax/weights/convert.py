"""AlexNet state_dicts <-> Flax variables, by an explicit name table per architecture.

Two architectures, told apart by their tensors' names and shapes (`state_dict_architecture`,
`variables_architecture`): "torchvision" is torchvision's AlexNet (`models.alexnet.AlexNet`),
"2012" the paper's (`models.alexnet2012.AlexNet2012`; its torch layout is `weights/reference.py`'s
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

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from alexnet_jax.models.layers import POOL_OUTPUT
from alexnet_jax.models.variables import (
    POOLED_CHANNELS,
    ConversionError,
    flat_params,
    head_size,
    match_architecture,
    match_variables,
    param_shapes,
)


def _linear_chw_to_flax(w: np.ndarray) -> np.ndarray:
    out = w.shape[0]
    return w.reshape(out, POOLED_CHANNELS, POOL_OUTPUT, POOL_OUTPUT).transpose(2, 3, 1, 0).reshape(-1, out)


def _linear_chw_to_torch(k: np.ndarray) -> np.ndarray:
    out = k.shape[1]
    return k.reshape(POOL_OUTPUT, POOL_OUTPUT, POOLED_CHANNELS, out).transpose(3, 2, 0, 1).reshape(out, -1)


# name -> (torch -> flax, flax -> torch). Each pair is a permutation, so round trips are bit-exact.
_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    "linear": (lambda w: w.T, lambda k: k.T),
    "linear_chw": (_linear_chw_to_flax, _linear_chw_to_torch),
    "bias": (lambda b: b, lambda b: b),
}


def _transform(path: str) -> str:
    module, leaf = path.split("/")
    if leaf == "bias":
        return "bias"
    if module.startswith("features_"):
        return "conv"
    return "linear_chw" if module == "classifier_1" else "linear"


def _torch_shape(transform: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if transform in ("linear", "linear_chw"):
        return flax_shape[::-1]
    return flax_shape


def _table(
    num_classes: int, architecture: str = "torchvision"
) -> list[tuple[str, tuple[str, str], str, tuple[int, ...]]]:
    """(torch name, flax path, transform, torch shape) for every tensor of `architecture`'s AlexNet.

    The Flax layers are named after torchvision's modules (`features_0` is `features.0`,
    `kernel` is `weight`), so each row follows from the models' layout (`param_shapes`).
    """
    rows = []
    for path, shape in param_shapes(num_classes, architecture).items():
        module, leaf = path.split("/")
        transform = _transform(path)
        torch_name = f"{module.replace('_', '.')}.{'weight' if leaf == 'kernel' else 'bias'}"
        rows.append((torch_name, (module, leaf), transform, _torch_shape(transform, shape)))
    return rows


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


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a leading `module.` (DataParallel / DistributedDataParallel) from every key that has one."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _require_mapping(state_dict: Any) -> None:
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")


def _state_dict_match(shapes: Mapping[str, tuple[int, ...]], architecture: str | None) -> tuple[str, int]:
    num_classes = head_size(shapes, "classifier.6.weight", axis=0)
    found = match_architecture(
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


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables of either architecture -> the torch state_dict of numpy arrays.

    `torchvision.models.AlexNet(num_classes).load_state_dict({k: torch.from_numpy(v)})`
    accepts a "torchvision" result, `weights.reference.torch_alexnet2012_class()` a "2012" one.
    **Raises:** ConversionError as `check_variables` does.
    """
    arch, num_classes = match_variables(variables, None)
    flat = flat_params(variables)
    # Fresh writable copies: torch.from_numpy warns on (and must not alias) read-only jax buffers.
    return {
        name: np.array(_TRANSFORMS[transform][1](np.asarray(flat["/".join(path)])), order="C", copy=True)
        for name, path, transform, _ in _table(num_classes, arch)
    }
