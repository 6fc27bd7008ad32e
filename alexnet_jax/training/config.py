"""`TrainConfig`: one training run's settings, every check of them, and the defaults each architecture gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alexnet_jax.archs import COLOUR_PCA_CHOICES, get_arch
from alexnet_jax.distributed.parallel import check_parallel_mode
from alexnet_jax.models.layers import check_conv_algorithm
from alexnet_jax.steps import BASE_LR, EPOCHS, LR_STEP_EPOCHS, scaled_lr
from alexnet_jax.training.recipe import RECIPES, default_weight_decay
from alexnet_jax.transforms.augment import EVAL_CROPS

# Fields that decide the trajectory: a resumed run must have the same ones to end where an
# uninterrupted run would. `epochs` may grow (StepLR does not depend on it); `workers` changes nothing.
RUN_DEFINING = (
    "data",
    "arch",
    "colour_pca",
    "batch_size",
    "image_size",
    "seed",
    "recipe",
    "lr",
    "weight_decay",
    "lr_step_epochs",
    "patience",
    "num_classes",
    "init_from",
    "freeze_features",
    "parallel",
    "micro_batches",
)


def run_defining(config: TrainConfig) -> tuple[str, ...]:
    # The paper's recipe lowers the rate when val top-1 stalls, so there the val set (and how
    # it is evaluated) steers too.
    return RUN_DEFINING + (("val_data", "eval_crops") if config.recipe == "paper" else ())


@dataclasses.dataclass
class TrainConfig:
    """One training run. None means the default of `arch` (`archs.ARCHS`) or of the recipe.

    `arch` "torchvision" (torchvision's AlexNet and recipe: image_size 224, batch 256,
    recipe "torchvision", no colour noise) or "2012" (the paper's: 227, 128, "paper",
    ImageNet's colour PCA). `lr=None` is 0.01 scaled linearly from the arch's base
    batch (256 or 128) to `batch_size`; `weight_decay=None` the recipe's.
    `colour_pca`: "imagenet" (the published eigen-decomposition), "folder" (computed
    from `data`, written to colour_pca.json) or "none". `eval_crops`: 1 (the centre) or
    10 (softmax averaged over TenCrop's crops).
    """

    data: str
    val_data: str
    epochs: int = EPOCHS
    batch_size: int | None = None
    lr: float | None = None
    image_size: int | None = None
    init_from: str | None = None
    num_classes: int | None = None  # default: the number of class folders
    seed: int = 0
    recipe: str | None = None
    arch: str = "torchvision"
    colour_pca: str | None = None  # None: the arch's default (a None in config.json means that too)
    eval_crops: int = 1
    weight_decay: float | None = None
    lr_step_epochs: int = LR_STEP_EPOCHS
    patience: int = 1  # paper recipe: evaluations without a better val top-1 before lr /= 10
    freeze_features: bool = False
    workers: int = 0
    save_every: int = 1000  # steps; 0 saves only at the end of each epoch
    keep: int = 3
    progress: bool = True
    parallel: str = "none"  # "pmap" or "sharded" use every device; "sharded" also spans processes
    micro_batches: int = 1  # gradient accumulation: each step sums the gradients of this many micro-batches
    # AlexNet's conv_algorithm: XLA's convolution compiles in seconds; "auto" (the CLI's
    # default) takes Winograd on a CPU, where steps are faster. Not run-defining: the algorithms
    # compute the same function and differ in rounding only (a switch on resume is no longer
    # bit-exact, nothing more).
    conv_algorithm: str = "xla"

    def validate(self) -> None:
        """**Raises:** ValueError naming the first field (as its CLI flag) that no run can use."""
        arch = get_arch(self.arch)
        if self.image_size is not None:
            arch.check_image_size(self.image_size)
        for name in ("epochs", "batch_size", "keep", "patience", "lr_step_epochs", "micro_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("save_every", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num-classes must be at least 1, got {self.num_classes}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {', '.join(RECIPES)}")
        if self.colour_pca is not None and self.colour_pca not in COLOUR_PCA_CHOICES:
            raise ValueError(f"unknown colour-pca {self.colour_pca!r}; expected one of {', '.join(COLOUR_PCA_CHOICES)}")
        if self.eval_crops not in EVAL_CROPS:
            raise ValueError(f"eval-crops must be one of {', '.join(map(str, EVAL_CROPS))}, got {self.eval_crops}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight-decay must be at least 0, got {self.weight_decay}")
        check_conv_algorithm(self.conv_algorithm)
        if self.conv_algorithm not in arch.conv_algorithms:
            raise ValueError(
                f"conv-algorithm {self.conv_algorithm!r} is not available for --arch {self.arch}; "
                f"use one of {', '.join(arch.conv_algorithms)}"
            )
        check_parallel_mode(self.parallel)

    def with_arch_defaults(self) -> TrainConfig:
        """A copy with the arch's image size, batch size and recipe where they are None."""
        arch = get_arch(self.arch)
        return dataclasses.replace(
            self,
            image_size=arch.image_size if self.image_size is None else self.image_size,
            batch_size=arch.batch_size if self.batch_size is None else self.batch_size,
            recipe=arch.recipe if self.recipe is None else self.recipe,
        )

    def resolved(self, num_class_folders: int) -> TrainConfig:
        """A copy with the defaults that depend on the arch, the data and the recipe filled in, paths absolute."""
        self = self.with_arch_defaults()
        base_batch = get_arch(self.arch).batch_size
        return dataclasses.replace(
            self,
            data=str(Path(self.data).absolute()),
            val_data=str(Path(self.val_data).absolute()),
            init_from=None if self.init_from is None else str(Path(self.init_from).absolute()),
            lr=scaled_lr(self.batch_size, BASE_LR, base_batch) if self.lr is None else self.lr,
            weight_decay=default_weight_decay(self.recipe) if self.weight_decay is None else self.weight_decay,
            num_classes=num_class_folders if self.num_classes is None else self.num_classes,
        )
