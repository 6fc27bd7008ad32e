"""Flax variables `{"params": ...}` or a bare params tree: the one rule every function taking variables follows.

`load_variables` and `torch_to_flax` give `{"params": ...}`; an optimizer state, `nnx.state`
or a hand-built tree often holds the bare params. Both are accepted wherever variables are
taken (the models' `apply`, `trunk_features`, predict, features, LPIPS, the converters), so
the choice never turns into `KeyError: 'params'` or Flax's `ScopeCollectionNotFound`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def is_bare_params(variables: Any) -> bool:
    """Whether `variables` is a params tree without the `{"params": ...}` wrapper (a non-empty mapping of modules)."""
    return isinstance(variables, Mapping) and bool(variables) and "params" not in variables


def params_of(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params tree of `{"params": ...}` variables, or `variables` itself when it is the bare tree."""
    return variables if is_bare_params(variables) else variables["params"]


def as_variables(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """`variables` with the params under "params": a bare tree is wrapped, anything else is returned as it is."""
    return {"params": variables} if is_bare_params(variables) else variables


class AcceptsBareParams(nn.Module):
    """A linen module whose `apply` takes a bare params tree as well as `{"params": ...}`."""

    def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().apply(as_variables(variables), *args, **kwargs)


def cast_floating(tree: Any, dtype: Any) -> tuple[Any, list[str]]:
    """`tree` with every floating-point array in `dtype` (others untouched), as numpy arrays, and the names of
    the floating dtypes that were cast (sorted; empty when all were `dtype` already).

    What the converter writes and what training starts from: weights kept in float16 or
    bfloat16 would otherwise stay so, and most updates of a fine-tuning rate round away below
    half precision's resolution.
    """
    dtype = np.dtype(dtype)
    cast: set[str] = set()

    def one(leaf: Any) -> Any:
        array = np.asarray(leaf)
        if not jnp.issubdtype(array.dtype, jnp.floating) or array.dtype == dtype:
            return leaf
        cast.add(array.dtype.name)
        return array.astype(dtype)

    return jax.tree.map(one, tree), sorted(cast)
