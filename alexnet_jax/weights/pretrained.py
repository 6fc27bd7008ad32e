"""One call from weights to a ready model: `load_model`.

    from alexnet_jax import load_model
    model, variables = load_model()                    # torchvision's IMAGENET1K_V1 (torch hub's cache)
    model, variables = load_model("alexnet.msgpack")   # a converted file, any head size, either architecture
    logits = jax.jit(model.apply)(variables, images)   # variables already on the device

Sources: a `WeightsRecord` (or its name, "IMAGENET1K_V1"), fetched through torch hub's
cache with its hash checked and converted on the fly (without torch: `weights.torch_file`
reads the file); a variables file written by `save_variables` or `alexnet-jax convert`
(`.msgpack`, or `.safetensors` with our names); or torchvision weights in a file
(`.pth`/`.pt`, or `.safetensors` with torchvision's names), converted on the fly.
Files of the 2012 paper's layout give an `AlexNet2012`, torchvision's an `AlexNet`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from alexnet_jax.models.variables import model_for, variables_architecture
from alexnet_jax.weights.convert import torch_to_flax
from alexnet_jax.weights.serialization import is_safetensors, load_variables
from alexnet_jax.weights.torchvision import IMAGENET1K_V1, WeightsRecord, fetch_state_dict, load_checkpoint

RECORDS: dict[str, WeightsRecord] = {IMAGENET1K_V1.name: IMAGENET1K_V1}
TORCH_SUFFIXES = (".pth", ".pt")


def _variables_from(source: str | os.PathLike | WeightsRecord, progress: bool) -> dict[str, Any]:
    if isinstance(source, str) and source in RECORDS:
        source = RECORDS[source]
    if isinstance(source, WeightsRecord):
        state_dict, _ = fetch_state_dict(source.url, progress=progress)
        return torch_to_flax(state_dict)
    path = Path(source)
    if path.suffix in TORCH_SUFFIXES or (is_safetensors(path) and not _is_ours(path)):
        return torch_to_flax(load_checkpoint(path))  # strips DataParallel's `module.` prefixes
    return load_variables(path, device=False)


def _is_ours(path: Path) -> bool:
    # Our safetensors keys are "params/features_0/kernel"; torchvision's "features.0.weight".
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return any(key.startswith("params/") for key in f.keys())
    except Exception:  # noqa: BLE001 - a bad file: let the reader below name the problem
        return True


def load_model(
    source: str | os.PathLike | WeightsRecord = IMAGENET1K_V1,
    *,
    dtype: Any = jnp.float32,
    dropout_rate: float = 0.5,
    conv_algorithm: str = "xla",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model the weights are for (`AlexNet` or `AlexNet2012`, num_classes to fit), and its variables on the device.

    **Arguments:** source, see the module docstring (default torchvision's ImageNet
    weights); dtype, dropout_rate, conv_algorithm as `AlexNet`'s fields (`AlexNet2012`
    has XLA's convolution only); progress, a download progress bar.
    **Returns:** (model, {"params": ...} of device arrays).
    **Raises:** WeightsError (weights that cannot be had or read), FileNotFoundError,
    ValueError or ConversionError naming the file and the problem.
    """
    variables = _variables_from(source, progress)
    fields = {"dtype": dtype, "dropout_rate": dropout_rate}
    if variables_architecture(variables) == "torchvision":
        fields["conv_algorithm"] = conv_algorithm
    elif conv_algorithm != "xla":
        raise ValueError(f"{source}: AlexNet2012 weights run with XLA's convolution only, not {conv_algorithm!r}")
    model = model_for(variables, **fields)
    return model, jax.device_put({"params": variables["params"]})
