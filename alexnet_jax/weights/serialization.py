"""Flax variables to and from one file: msgpack by default, safetensors by suffix.

The tree is checked (`models.variables.check_variables`) before it is written and after
it is read, and every write is atomic (`alexnet_jax.files.atomic_write_bytes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from alexnet_jax.files import atomic_write_bytes
from alexnet_jax.models.trees import as_variables
from alexnet_jax.models.variables import ConversionError, check_variables

_SEP = "/"  # safetensors keys: "params/features_0/kernel"


def _to_numpy_tree(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in variables.items()}


def variables_to_bytes(variables: Mapping[str, Any], *, safetensors: bool = False) -> bytes:
    """AlexNet variables (or the bare params tree, written under "params") as the bytes of a msgpack (default)
    or safetensors file; the tree is checked first."""
    check_variables(variables)
    tree = _to_numpy_tree(as_variables(variables))
    if safetensors:
        from safetensors.numpy import save

        flat = traverse_util.flatten_dict(tree, sep=_SEP)
        return save({k: np.ascontiguousarray(v) for k, v in flat.items()}, metadata={"format": "alexnet_jax"})
    return serialization.msgpack_serialize(tree)


def variables_from_bytes(data: bytes, *, safetensors: bool = False, name: str = "variables") -> dict[str, Any]:
    """The inverse of `variables_to_bytes`. **Raises:** ValueError starting with `name` on bad bytes."""
    try:
        if safetensors:
            from safetensors.numpy import load

            tree = traverse_util.unflatten_dict(load(data), sep=_SEP)
        else:
            tree = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack and safetensors raise many types on bad bytes
        raise ValueError(f"{name}: truncated or corrupt variables file ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{name}: not an alexnet_jax variables file (no 'params' at the top)")
    try:
        check_variables(tree)
    except ConversionError as e:
        raise ValueError(f"{name}: {e}") from e
    return tree


def is_safetensors(path: str | os.PathLike) -> bool:
    return Path(path).suffix == ".safetensors"


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> Path:
    """Save AlexNet variables (`{"params": ...}`, or the bare params tree) to `path` atomically.

    `.safetensors` writes safetensors; any other suffix writes a flax msgpack file.
    The tree is checked first, so a wrong tree never reaches the disk.
    **Returns:** the path written.
    """
    path = Path(path)
    atomic_write_bytes(path, variables_to_bytes(variables, safetensors=is_safetensors(path)))
    return path


def load_variables(path: str | os.PathLike, *, device: bool = True) -> dict[str, Any]:
    """Read variables written by `save_variables` (or `alexnet-jax convert`).

    **Returns:** `{"params": ...}`, placed on JAX's default device (`device=False`:
    numpy arrays on the host). Device arrays matter for speed: a jitted apply given
    numpy copies all 244 MB to the device at every call. `check_variables(variables)`
    gives the head's size, `AlexNet(num_classes=...)` needs it; `load_model` does both.
    Files of the 2012 paper's layout load the same way: `model_for(variables)` builds
    `AlexNet2012(num_classes=...)` for them (and `AlexNet` for torchvision's).
    **Raises:** FileNotFoundError, or ValueError naming the file when it is
    truncated, corrupt or not an AlexNet tree of either architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    variables = variables_from_bytes(path.read_bytes(), safetensors=is_safetensors(path), name=str(path))
    return jax.device_put(variables) if device else variables
