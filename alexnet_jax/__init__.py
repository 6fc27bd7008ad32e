"""torchvision's AlexNet and the 2012 paper's (`AlexNet2012`) in JAX/Flax, with a strict, verified weights bridge.

    from alexnet_jax import load_model
    model, variables = load_model("alexnet.msgpack")      # or load_model() for torchvision's weights
    logits = jax.jit(model.apply)(variables, images_nhwc)  # (N, num_classes)

Importing this package changes nothing process-wide; `keep_freed_memory()` is an explicit
choice for entry scripts (see `alexnet_jax.host_memory`).
"""

from .convert import (
    ConversionError,
    check_variables,
    flax_to_torch,
    model_for,
    state_dict_architecture,
    torch_to_flax,
    variables_architecture,
)
from .host_memory import keep_freed_memory
from .io import load_variables, save_variables
from .labels import IMAGENET_CLASSES
from .model import AlexNet, replace_head, trunk_features
from .model2012 import AlexNet2012
from .predict import Prediction, features, predict, predict_logits
from .preprocess import CROP_SIZE, MEAN_RGB, RESIZE_SIZE, STDDEV_RGB, preprocess, preprocess_batch
from .pretrained import load_model
from .steps import TrainState, create_train_state, eval_step, make_optimizer, train_step
from .weights import IMAGENET1K_V1

# The training loop needs the `train` extra (Orbax, Grain, matplotlib): imported on first use,
# so that the core package imports without it.
_LAZY = {"TrainConfig": "train", "train_and_evaluate": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlexNet",
    "AlexNet2012",
    "ConversionError",
    "CROP_SIZE",
    "IMAGENET1K_V1",
    "IMAGENET_CLASSES",
    "MEAN_RGB",
    "Prediction",
    "RESIZE_SIZE",
    "STDDEV_RGB",
    "TrainConfig",
    "TrainState",
    "check_variables",
    "create_train_state",
    "eval_step",
    "features",
    "flax_to_torch",
    "keep_freed_memory",
    "load_model",
    "load_variables",
    "make_optimizer",
    "model_for",
    "predict",
    "predict_logits",
    "preprocess",
    "preprocess_batch",
    "replace_head",
    "save_variables",
    "state_dict_architecture",
    "torch_to_flax",
    "train_and_evaluate",
    "train_step",
    "trunk_features",
    "variables_architecture",
]
