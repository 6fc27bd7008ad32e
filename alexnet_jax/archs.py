"""The architectures training and prediction can run, in one name table: model, input size, transforms, recipe.

    arch = get_arch("2012")
    model = arch.model(num_classes=10)                 # AlexNet2012(num_classes=10)
    x = arch.eval_transform(image, arch.image_size, 10)  # (10, 227, 227, 3)

"torchvision" is torchvision's AlexNet (`models.alexnet.AlexNet`, the 2014 "one weird trick"
variant) with torchvision's reference recipe; "2012" is the paper's (`models.alexnet2012.AlexNet2012`)
with the paper's data and recipe. Everything that differs between them is a field
here, so the training loop, the data pipeline and `predict` never ask which one they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from PIL import Image

from alexnet_jax.models.alexnet import MIN_SIZE, AlexNet, replace_head
from alexnet_jax.models.alexnet2012 import INIT_NAMES, INPUT_SIZE, AlexNet2012, stack_sizes
from alexnet_jax.models.alexnet2012 import replace_head as replace_head_2012
from alexnet_jax.models.layers import CONV_ALGORITHMS
from alexnet_jax.models.layers import POOL_OUTPUT as _POOL_OUTPUT
from alexnet_jax.models.variables import ARCHITECTURES, Architecture
from alexnet_jax.transforms.augment import (
    eval_pixels,
    eval_transform,
    paper_eval_pixels,
    paper_eval_transform,
    paper_train_pixels,
    paper_train_transform,
    train_pixels,
    train_transform,
)
from alexnet_jax.transforms.preprocess import CROP_SIZE

COLOUR_PCA_CHOICES = ("imagenet", "folder", "none")
# `--arch 2012`'s default initialization: of the originals' (`alexnet2012.INITS`), the one closest
# to the paper that learns here (docs/alexnet2012.md has the measurements); "paper" stays a choice.
TRAINING_INIT = "caffe"


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture and the defaults of its recipe.

    `model(num_classes, conv_algorithm, dtype)` builds the linen module; `train_transform(image,
    size, rng)` and `eval_transform(image, size, crops)` are the per-image transforms of
    `alexnet_jax.transforms.augment` (normalized float32, what `predict` feeds), `train_pixels(image,
    size, rng, decode)` and `eval_pixels(image, size, crops, decode)` the same as uint8 (what the
    training pipeline hands over); `image_sizes` says which crop sides the model takes.
    (`models.variables.ARCHITECTURES` holds the same names' parameter layouts.)
    """

    name: str
    model: Callable[..., nn.Module]
    image_size: int  # default crop side, training and evaluation
    init_size: int  # an input side `init` traces the model at (parameters do not depend on it)
    image_sizes: Callable[[int], bool]
    size_rule: str  # what `image_sizes` accepts, for error messages
    train_transform: Callable[[Image.Image, int, np.random.Generator], np.ndarray]
    eval_transform: Callable[[Image.Image, int, int], np.ndarray]
    train_pixels: Callable[[Image.Image, int, np.random.Generator, str], np.ndarray]
    eval_pixels: Callable[[Image.Image, int, int, str], np.ndarray]
    recipe: str  # "torchvision" or "paper" (see `training.recipe.RECIPES`)
    batch_size: int  # default global batch, and the batch the base rate 0.01 is for (others scale it linearly)
    colour_pca: str  # default colour noise, one of COLOUR_PCA_CHOICES
    conv_algorithms: tuple[str, ...]  # `models.layers.CONV_ALGORITHMS` the model honours
    # The named initializations `model(..., init=name)` draws (`--init`) and the default; () and
    # None for a model with one initialization of its own (then `model` takes no `init`).
    inits: tuple[str, ...] = ()
    init: str | None = None
    # `replace_head(params, num_classes, seed=, init=)`: params with a fresh classifier_6 for
    # `num_classes` outputs (fine-tuning with another class count), drawn as `init` draws it.
    replace_head: Callable[..., dict[str, Any]] = lambda params, num_classes, *, seed, init=None: replace_head(
        params, num_classes, seed=seed
    )  # AlexNet's own head: LeCun normal, zero bias
    two_towers: bool = False  # `distributed.towers` runs it one tower per device (`--parallel towers`)

    def check_init(self, init: str | None) -> None:
        """**Raises:** ValueError when `init` is not one of this architecture's initializations (None always is)."""
        if init is None:
            return
        if not self.inits:
            raise ValueError(f"--init chooses among the 2012 network's initializations; --arch {self.name} has one")
        if init not in self.inits:
            raise ValueError(f"unknown init {init!r} for --arch {self.name}; expected one of {', '.join(self.inits)}")

    def check_image_size(self, image_size: int) -> None:
        """**Raises:** ValueError when this architecture cannot take `image_size` x `image_size` crops."""
        if not self.image_sizes(image_size):
            raise ValueError(f"image-size must be {self.size_rule}, got {image_size}")


def _alexnet(num_classes: int, conv_algorithm: str = "xla", dtype: Any = jnp.float32) -> nn.Module:
    return AlexNet(num_classes=num_classes, conv_algorithm=conv_algorithm, dtype=dtype)


def _alexnet2012(
    num_classes: int, conv_algorithm: str = "xla", dtype: Any = jnp.float32, init: str = TRAINING_INIT
) -> nn.Module:
    # Its grouped convolutions are XLA's; the conv_algorithm choice is the torchvision model's
    # ("auto" ends at XLA here, "winograd" is refused by `TrainConfig.validate`).
    return AlexNet2012(num_classes=num_classes, dtype=dtype, initialization=init)


ARCHS: dict[str, Arch] = {
    "torchvision": Arch(
        name="torchvision",
        model=_alexnet,
        image_size=CROP_SIZE,
        init_size=MIN_SIZE,  # the cheapest trace
        image_sizes=lambda s: s >= MIN_SIZE,
        size_rule=f"at least {MIN_SIZE} (AlexNet's smallest input)",
        train_transform=train_transform,
        eval_transform=eval_transform,
        train_pixels=train_pixels,
        eval_pixels=eval_pixels,
        recipe="torchvision",
        batch_size=256,
        colour_pca="none",
        conv_algorithms=CONV_ALGORITHMS,
    ),
    "2012": Arch(
        name="2012",
        model=_alexnet2012,
        image_size=INPUT_SIZE,
        init_size=INPUT_SIZE,
        # 227-258 end the conv stack at 6x6 (the pools round down); crops come from 256x256 images.
        image_sizes=lambda s: s <= 256 and stack_sizes(s)[-1] == _POOL_OUTPUT,
        size_rule=f"{INPUT_SIZE} to 256 for --arch 2012 (a crop of its 256x256 images with a 6x6 conv5 map)",
        train_transform=paper_train_transform,
        eval_transform=paper_eval_transform,
        train_pixels=paper_train_pixels,
        eval_pixels=paper_eval_pixels,
        recipe="paper",
        batch_size=128,
        colour_pca="imagenet",
        conv_algorithms=("xla", "auto"),
        inits=INIT_NAMES,
        init=TRAINING_INIT,
        replace_head=replace_head_2012,
        two_towers=True,
    ),
}


def get_arch(name: str) -> Arch:
    """**Raises:** ValueError naming the known architectures."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(ARCHS)}")
    return ARCHS[name]


def register_arch(arch: Arch, layout: Architecture) -> None:
    """Add one architecture to both name tables: `ARCHS` (training, prediction) and its parameter layout to
    `models.variables.ARCHITECTURES` (what `check_variables`, `save_variables` and the converter check against).

    For a network defined outside this package (the test suite registers a tiny one, so
    orchestration tests do not train 61M parameters). Its module must name its layers as
    AlexNet does (`features_<i>`, `classifier_1/4/6`): fine-tuning matches them by name. The
    converter's `classifier.1` permutation reads a 256x6x6 map, so only layouts whose
    classifier_1 reads one convert to and from torch.
    **Raises:** ValueError when `arch.name` and `layout.name` differ or the name is taken in either table.
    """
    if arch.name != layout.name:
        raise ValueError(f"arch {arch.name!r} and its layout {layout.name!r} must have the same name")
    if arch.name in ARCHS or arch.name in ARCHITECTURES:
        raise ValueError(f"arch {arch.name!r} is already registered; choose another name")
    ARCHS[arch.name] = arch
    ARCHITECTURES[arch.name] = layout
