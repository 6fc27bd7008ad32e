"""torchvision's AlexNet and the 2012 paper's (`AlexNet2012`) in JAX/Flax, with a strict, verified weights bridge.

    from alexnet_jax import load_model
    model, variables = load_model("alexnet.msgpack")      # or load_model() for torchvision's weights
    logits = jax.jit(model.apply)(variables, images_nhwc)  # (N, num_classes)

The package, by layer (each imports only from the layers below it; tests/test_layout.py checks):

    cli/                  the `alexnet-jax` command: convert, classify, lpips, export, train
    export/               the classifier, trunk or LPIPS as a jax.export artifact or an ONNX model
    lpips.py              LPIPS on the AlexNet trunk
    training/             config, input pipeline, loop, checkpoints, workdir, signals (the `train` extra)
    inference/            predict, features, classify, verify, labels, pictures
    distributed/          pmap / sharded steps, the paper's two towers, multi-process start-up and lost peers
    weights/              torchvision <-> Flax conversion, downloads, files, load_model (torch, when called)
    archs.py, steps.py    the architectures' name table; the pure train and eval steps
    models/, transforms/  the networks (linen and NNX); image reading, preprocessing, augmentation
    files.py, errors.py, host_memory.py, upstream.py
                          atomic writes, one-line errors, the opt-in allocator setting, private upstream names

Importing this package changes nothing process-wide; `keep_freed_memory()` is an explicit
choice for entry scripts (see `alexnet_jax.host_memory`).
"""

from alexnet_jax.host_memory import keep_freed_memory
from alexnet_jax.inference.labels import IMAGENET_CLASSES
from alexnet_jax.inference.predict import Prediction, features, predict, predict_logits
from alexnet_jax.models.alexnet import AlexNet, replace_head, trunk_features
from alexnet_jax.models.alexnet2012 import AlexNet2012
from alexnet_jax.models.variables import ConversionError, check_variables, model_for, variables_architecture
from alexnet_jax.steps import TrainState, create_train_state, eval_step, make_optimizer, train_step
from alexnet_jax.transforms.preprocess import (
    CROP_SIZE,
    MEAN_RGB,
    RESIZE_SIZE,
    STDDEV_RGB,
    preprocess,
    preprocess_batch,
)
from alexnet_jax.weights.convert import flax_to_torch, state_dict_architecture, torch_to_flax
from alexnet_jax.weights.pretrained import load_model
from alexnet_jax.weights.serialization import load_variables, save_variables
from alexnet_jax.weights.torchvision import IMAGENET1K_V1

# The training loop needs the `train` extra (Orbax, Grain, matplotlib): imported on first use,
# so that the core package imports without it.
_LAZY = {"TrainConfig": "training.config", "train_and_evaluate": "training.loop"}

# Modules of the flat layout before 0.2 -> where their names live now (the first that has a
# name wins). `import alexnet_jax.nnx_model` and `from alexnet_jax import towers` keep
# working, with one FutureWarning line naming the new place.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "augment": ("transforms.augment",),
    "checkpoint": ("training.checkpoint",),
    "classify": ("inference.classify",),
    "convert": ("weights.convert", "models.variables"),
    "coordinator_service": ("distributed.coordinator_service",),
    "data": ("training.pipeline", "transforms.augment"),
    "images": ("transforms.images",),
    "io": ("files", "weights.serialization"),
    "labels": ("inference.labels",),
    "model": ("models.alexnet", "models.layers"),
    "model2012": ("models.alexnet2012",),
    "nnx_model": ("models.nnx",),
    "parallel": ("distributed.parallel",),
    "peers": ("distributed.peers",),
    "predict": ("inference.predict",),
    "preprocess": ("transforms.preprocess",),
    "pretrained": ("weights.pretrained",),
    "reference": ("weights.reference",),
    "shutdown": ("training.shutdown",),
    "towers": ("distributed.towers",),
    "train": ("training.config", "training.recipe", "training.loop", "training.metrics", "training.workdir"),
    "verify": ("inference.verify",),
    "visualize": ("inference.pictures",),
    "weights": ("weights.torchvision", "errors"),
    "winograd": ("models.winograd",),
    "workdir": ("training.workdir",),
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in MOVED_MODULES:  # `alexnet_jax.towers`, `from alexnet_jax import towers`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_moved_modules() -> None:
    # `import alexnet_jax.<old>` finds these entries in sys.modules before looking for a file;
    # each imports its new home only when a name is first read from it. Only names under
    # this package are touched.
    import sys

    from alexnet_jax._moved import MovedModule

    for old, new in MOVED_MODULES.items():
        sys.modules.setdefault(f"{__name__}.{old}", MovedModule(f"{__name__}.{old}", new))


_register_moved_modules()

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
