"""`TrainConfig`: one training run's settings, every check of them, and the defaults each architecture gives."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from alexnet_jax.archs import ARCHS, COLOUR_PCA_CHOICES, TRAINING_INIT, get_arch
from alexnet_jax.distributed.parallel import MODES, check_parallel_mode
from alexnet_jax.models.alexnet2012 import INIT_NAMES
from alexnet_jax.models.layers import CONV_ALGORITHMS, check_conv_algorithm
from alexnet_jax.steps import BASE_LR, EPOCHS, LR_STEP_EPOCHS, scaled_lr
from alexnet_jax.training.recipe import RECIPES, default_weight_decay
from alexnet_jax.transforms.augment import DECODE_MODES, EVAL_CROPS, check_decode

# Fields that decide the trajectory: a resumed run must have the same ones to end where an
# uninterrupted run would. `epochs` may grow (StepLR does not depend on it); `workers` changes
# nothing; `init` neither (a resumed run's parameters are the checkpoint's).
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
    "decode",
)
# What a run from before a field existed did, for a config.json that lacks the field: the
# pipeline decoded every image whole before `decode` was a setting.
EARLIER_DEFAULTS = {"decode": "exact"}


# Layouts that compute the same trajectory: the two towers draw the sharded layout's dropout
# masks for the whole batch and differ from it in float rounding only, so a run saved under
# one resumes under the other.
_SAME_TRAJECTORY = {"parallel": {"towers": "sharded"}}


def same_trajectory(name: str, a: Any, b: Any) -> bool:
    """Whether run-defining field `name` with values `a` and `b` gives the same run (resuming compares them)."""
    same = _SAME_TRAJECTORY.get(name, {})
    return same.get(a, a) == same.get(b, b)


def run_defining(config: TrainConfig) -> tuple[str, ...]:
    # The paper's recipe lowers the rate when val top-1 stalls, so there the val set (and how
    # it is evaluated) steers too.
    return RUN_DEFINING + (("val_data", "eval_crops") if config.recipe == "paper" else ())


# Each field's command-line help travels with it: `alexnet-jax train` makes a flag of every
# field (`alexnet_jax.cli.flags`), so a setting is defined once, here.
def _setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple = (),
    cli_default: Any = dataclasses.MISSING,
) -> Any:
    """A TrainConfig field with its flag's `help` and `choices`; `cli_default` where the CLI's default differs."""
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = choices
    if cli_default is not dataclasses.MISSING:
        metadata["cli_default"] = cli_default
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """One training run. None means the default of `arch` (`archs.ARCHS`) or of the recipe.

    `arch` "torchvision" (torchvision's AlexNet and recipe: image_size 224, batch 256,
    recipe "torchvision", no colour noise) or "2012" (the paper's: 227, 128, "paper",
    ImageNet's colour PCA). `lr=None` is 0.01 scaled linearly from the arch's base
    batch (256 or 128) to `batch_size`; `weight_decay=None` the recipe's.
    `colour_pca`: "imagenet" (the published eigen-decomposition), "folder" (computed
    from `data`, written to colour_pca.json) or "none". `eval_crops`: 1 (the centre) or
    10 (softmax averaged over TenCrop's crops). Each field's `metadata["help"]` is its
    flag's help in `alexnet-jax train`.
    """

    data: str = _setting(help="training images: an ImageFolder root, or a folder of `alexnet-jax pack` shards")
    val_data: str = _setting(help="validation images: an ImageFolder root (same class folders), or shards")
    epochs: int = _setting(EPOCHS, help="passes over --data")
    batch_size: int | None = _setting(None, help="global batch (default: 256; 128 for --arch 2012)")
    lr: float | None = _setting(None, help="learning rate (default 0.01 * batch-size / 256; / 128 for --arch 2012)")
    image_size: int | None = _setting(
        None, help="training and eval crop side (default 224, at least 63; 227 for --arch 2012, which takes 227-256)"
    )
    init: str | None = _setting(
        None,
        choices=INIT_NAMES,
        help="--arch 2012's initialization: the paper's (section 5), Caffe's bvlc_alexnet's or cuda-convnet2's "
        f"(docs/alexnet2012.md; default {TRAINING_INIT}, the one closest to the paper that learns); also for "
        "a head drawn for another class count over --init-from",
    )
    init_from: str | None = _setting(None, help="variables file to start from (e.g. converted torchvision weights)")
    num_classes: int | None = _setting(
        None,
        help="outputs of the head (default: the number of class folders); "
        "with --init-from a head of another size is replaced by a fresh one",
    )
    seed: int = _setting(0, help="fixes initialization, data order, augmentation, dropout")
    recipe: str | None = _setting(
        None,
        choices=RECIPES,
        help="torchvision: lr x0.1 every --lr-step-epochs, wd 1e-4; paper: lr /10 when val top-1 stops "
        "improving, wd 5e-4, the paper's momentum rule (default: torchvision; paper for --arch 2012)",
    )
    arch: str = _setting(
        "torchvision",
        choices=tuple(ARCHS),
        help="torchvision: torchvision's AlexNet and recipe; 2012: the paper's AlexNet (LRN, grouped convs), "
        "its 256x256 images, random 227 crops + flips + PCA colour noise, and its recipe",
    )
    # None: the arch's default (a None in config.json means that too).
    colour_pca: str | None = _setting(
        None,
        choices=COLOUR_PCA_CHOICES,
        help="the paper's PCA colour noise: ImageNet's published eigenvalues and eigenvectors, ones computed "
        "from --data (saved to colour_pca.json), or none (default: imagenet for --arch 2012, none otherwise)",
    )
    eval_crops: int = _setting(
        1,
        choices=EVAL_CROPS,
        help="validation: the centre crop, or the softmax averaged over the 4 corners, the centre and their "
        "mirrors (torchvision's TenCrop order; 10x the eval compute)",
    )
    decode: str = _setting(
        "reduced",
        choices=DECODE_MODES,
        help="reduced: JPEGs decoded at 1/2, 1/4 or 1/8 scale where the crop keeps its pixels (faster; pixels "
        "differ slightly, crops and flips do not); exact: every image decoded whole, torchvision's pixels",
    )
    weight_decay: float | None = _setting(None, help="default: the recipe's")
    lr_step_epochs: int = _setting(LR_STEP_EPOCHS, help="torchvision recipe: epochs between the rate's drops")
    patience: int = _setting(1, help="paper recipe: epochs without improvement")
    freeze_features: bool = _setting(False, help="train only the classifier (fine-tuning)")
    # The library decodes in threads by default: Grain's worker processes spawn, which needs
    # `if __name__ == "__main__":` in the caller's script. The CLI is such a program, and a
    # run is bound by decoding: worker processes on all but one core (at most 3; the step
    # needs the last).
    workers: int = _setting(
        0,
        help="image-decoding processes; 0 decodes in threads of this process",
        cli_default=min(4, os.cpu_count() or 1) - 1,
    )
    allow_data_change: bool = _setting(
        False,
        help="with --resume: go on although the training data changed since the run began (files added, removed "
        "or changed); the run continues from the step resumed, a fresh epoch on the new data",
    )
    save_every: int = _setting(1000, help="checkpoint every N steps, 0 for epoch ends only")
    keep: int = _setting(3, help="checkpoints kept besides the best")
    progress: bool = _setting(True, help="a progress bar")
    parallel: str = _setting(
        "none",
        choices=MODES,
        help="none: one device; pmap: jax.pmap over this machine's devices; "
        "sharded: jit with the batch split over all devices of all processes; "
        "towers: --arch 2012's two towers one per device, pairs of devices data-parallel",
    )
    micro_batches: int = _setting(1, help="gradient accumulation: split each step's batch into this many micro-batches")
    # AlexNet's conv_algorithm. The library's default, XLA's convolution, compiles in seconds;
    # the CLI's, "auto", takes Winograd on a CPU, where steps are faster: over a training run
    # that repays its longer compile. Not run-defining: the algorithms compute the same
    # function and differ in rounding only (a switch on resume is no longer bit-exact, nothing more).
    conv_algorithm: str = _setting(
        "xla",
        choices=CONV_ALGORITHMS,
        help="auto: Winograd for conv2-5 on a CPU in float32, where it pays over a run (faster steps, "
        "seconds more to compile), XLA's convolution elsewhere; or force winograd / xla",
        cli_default="auto",
    )

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
        check_decode(self.decode)
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
        if self.parallel == "towers" and not arch.two_towers:
            raise ValueError(f"parallel 'towers' is the 2012 network's two-tower layout; --arch {self.arch} has none")
        arch.check_init(self.init)

    def with_arch_defaults(self) -> TrainConfig:
        """A copy with the arch's image size, batch size and recipe where they are None."""
        arch = get_arch(self.arch)
        return dataclasses.replace(
            self,
            image_size=arch.image_size if self.image_size is None else self.image_size,
            batch_size=arch.batch_size if self.batch_size is None else self.batch_size,
            recipe=arch.recipe if self.recipe is None else self.recipe,
            init=arch.init if self.init is None else self.init,
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
