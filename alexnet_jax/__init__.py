"""torchvision's AlexNet in JAX/Flax, with a strict, verified bridge for its weights.

    from alexnet_jax import AlexNet, load_variables
    variables = load_variables("alexnet.msgpack")
    logits = AlexNet().apply(variables, images_nhwc)   # (N, 1000)
"""

from .host_memory import keep_freed_memory
from .convert import ConversionError, check_variables, flax_to_torch, torch_to_flax
from .io import load_variables, save_variables
from .labels import IMAGENET_CLASSES
from .model import AlexNet, replace_head, trunk_features
from .pretrained import load_model
from .predict import Prediction, features, predict, predict_logits
from .preprocess import CROP_SIZE, MEAN_RGB, RESIZE_SIZE, STDDEV_RGB, preprocess, preprocess_batch
from .weights import IMAGENET1K_V1
# The steps need only the core dependencies; train_and_evaluate needs the `train` extra.
from .train import TrainConfig, TrainState, create_train_state, eval_step, make_optimizer, train_and_evaluate, train_step

__all__ = [
    "AlexNet",
    "ConversionError",
    "CROP_SIZE",
    "IMAGENET1K_V1",
    "IMAGENET_CLASSES",
    "keep_freed_memory",
    "MEAN_RGB",
    "Prediction",
    "RESIZE_SIZE",
    "STDDEV_RGB",
    "check_variables",
    "features",
    "flax_to_torch",
    "load_model",
    "load_variables",
    "predict",
    "predict_logits",
    "preprocess",
    "preprocess_batch",
    "replace_head",
    "save_variables",
    "torch_to_flax",
    "trunk_features",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "eval_step",
    "make_optimizer",
    "train_and_evaluate",
    "train_step",
]
