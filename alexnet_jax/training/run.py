"""A `TrainConfig` resolved once: the architecture record, model, optimizer, device layout and data of a run.

    run = resolve_run(TrainConfig(data="train/", val_data="val/"))
    run.arch, run.model, run.tx, run.parallel        # Arch record, linen module, optax, Parallel or Towers
    run.train_data, run.steps_per_epoch, run.config  # the config with every default filled in

`train_and_evaluate` builds one `Run` before it touches the workdir and hands it to what it
calls: nothing below looks an architecture up by its name or derives a default again.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import optax

from alexnet_jax.archs import Arch, get_arch
from alexnet_jax.distributed.parallel import Parallel, make_parallel
from alexnet_jax.distributed.towers import Towers, check_towers, make_towers
from alexnet_jax.steps import make_optimizer
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.pipeline import check_shared_memory, colour_pca_from_folder, steps_per_epoch
from alexnet_jax.training.recipe import RECIPE_RULES, lr_for_recipe
from alexnet_jax.training.sources import ImageFolder, ShardSet, open_data
from alexnet_jax.transforms.augment import IMAGENET_PCA, ColourPCA


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the training loop takes from a `TrainConfig`, built by `resolve_run`."""

    config: TrainConfig  # `TrainConfig.resolved`: image size, batch, recipe, lr, weight decay, classes filled in
    arch: Arch
    model: nn.Module  # the arch's, with the config's classes and conv algorithm; no parameters yet
    tx: optax.GradientTransformation  # the recipe's schedule, momentum rule and weight decay
    parallel: Parallel | Towers  # where the state and batches live, the compiled step
    train_data: ImageFolder | ShardSet
    val_data: ImageFolder | ShardSet  # indexed with the training set's classes
    steps_per_epoch: int  # full global batches per epoch (at least 1)
    colour_pca: str  # "imagenet", "folder" or "none": the config's choice, else the arch's


def resolve_run(config: TrainConfig) -> Run:
    """Check `config`, fill in its defaults, index the data and build the model, optimizer and device layout.

    Reads the two folders' listings (or the shards' manifests), no image. The checks run in this order: the config
    (`TrainConfig.validate`), the batch against the devices (before any data is read:
    a usage error), the folders, the number of classes, one batch per epoch.
    **Raises:** ValueError (config, a batch that does not split over the devices, fewer
    classes than folders, fewer images than a batch), DataError (a folder).
    """
    config.validate()
    arch = get_arch(config.arch)
    config = config.with_arch_defaults()
    if config.parallel == "towers":  # built with the model below; its devices and batch checked now
        check_towers(global_batch=config.batch_size, micro_steps=config.micro_batches)
    else:
        parallel = make_parallel(config.parallel, global_batch=config.batch_size, micro_steps=config.micro_batches)
    train_data = open_data(config.data)
    val_data = open_data(config.val_data, classes=train_data.classes)
    config = config.resolved(len(train_data.classes))
    if config.num_classes < len(train_data.classes):
        raise ValueError(
            f"num-classes {config.num_classes} is less than the {len(train_data.classes)} class folders "
            f"in {config.data}"
        )
    if config.workers > 0:  # before the workdir is touched: a container's small /dev/shm
        largest = config.batch_size // jax.process_count() * config.eval_crops * config.image_size**2 * 3
        check_shared_memory(largest, config.workers)
    per_epoch = steps_per_epoch(len(train_data), config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{config.data}: {len(train_data)} images is less than one batch of {config.batch_size}")
    tx = make_tx(config, per_epoch)
    # An architecture with one initialization of its own takes no `init` (config.init is None then).
    init = {} if config.init is None else {"init": config.init}
    model = arch.model(config.num_classes, config.conv_algorithm, **init)
    if config.parallel == "towers":
        parallel = make_towers(model, global_batch=config.batch_size, micro_steps=config.micro_batches)
    return Run(
        config=config,
        arch=arch,
        model=model,
        tx=tx,
        parallel=parallel,
        train_data=train_data,
        val_data=val_data,
        steps_per_epoch=per_epoch,
        colour_pca=config.colour_pca or arch.colour_pca,
    )


def colour_pca_values(run: Run, *, progress: bool = False) -> ColourPCA | None:
    """The run's colour noise: ImageNet's, None, or the PCA of `run.train_data` (deterministic in folder and seed).

    The one part of a run computed from the images (up to `pipeline.PCA_MAX_IMAGES` of
    them), so the loop asks for it once it owns the workdir, not in `resolve_run`.
    """
    if run.colour_pca == "none":
        return None
    if run.colour_pca == "imagenet":
        return IMAGENET_PCA
    return colour_pca_from_folder(run.train_data, seed=run.config.seed, progress=progress)


def make_tx(config: TrainConfig, steps_per_epoch: int, epoch_base: tuple[int, int] = (0, 0)):
    """The optimizer of a resolved `config`: its recipe's schedule, momentum rule and weight decay.

    `epoch_base` (step, epoch) where the current data began (a run resumed on changed data), so
    that the schedule's epochs are the loop's.
    """
    return make_optimizer(
        lr_for_recipe(
            config.recipe, config.lr, steps_per_epoch, step_epochs=config.lr_step_epochs, epoch_base=epoch_base
        ),
        weight_decay=config.weight_decay,
        freeze_features=config.freeze_features,
        rule=RECIPE_RULES[config.recipe],
    )
