"""The training loop and its config: data, steps, evaluation, checkpoints, metrics, curves.

    last = train_and_evaluate(TrainConfig(data="train/", val_data="val/", epochs=10), "runs/a")

Needs the `train` extra (Orbax, Grain, matplotlib). The pure steps it runs are in
`alexnet_jax.steps`, their placement on devices in `alexnet_jax.parallel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from .archs import COLOUR_PCA_CHOICES, get_arch
from .augment import EVAL_CROPS, IMAGENET_PCA, ColourPCA
from .checkpoint import Checkpoints
from .convert import check_variables
from .data import (
    ImageFolder,
    check_image_size,
    colour_pca_from_folder,
    eval_batches,
    image_folder,
    steps_per_epoch,
    train_batches,
)
from .io import atomic_write_bytes, check_writable_folder, load_variables, save_variables
from .model import check_conv_algorithm, replace_head
from .parallel import check_parallel_mode, make_parallel
from .shutdown import StopRequested, StopSignals
from .steps import (
    BASE_LR,
    EPOCHS,
    LR_STEP_EPOCHS,
    WEIGHT_DECAY,
    TrainState,
    create_train_state,
    current_learning_rate,
    eval_step,
    init_params,
    make_optimizer,
    scaled_lr,
    set_learning_rate,
    step_schedule,
    summarize_eval,
)
from .workdir import WorkdirBusyError, WorkdirLock, finished_results, remove_results

# The 2012 paper (Krizhevsky et al., section 5): wd 5e-4, lr divided by 10 whenever the
# validation error stopped improving at the current rate.
PAPER_WEIGHT_DECAY = 5e-4
PAPER_LR_FACTOR = 0.1

# Recipe -> momentum rule (`steps.UPDATE_RULES`). The paper's recipe divides the rate by 10
# mid-run, where torch's formulation and the paper's part ways (`steps.sgd_paper`), so it
# runs the paper's own rule.
RECIPE_RULES = {"torchvision": "torch", "paper": "paper"}
RECIPES = tuple(RECIPE_RULES)


@dataclasses.dataclass
class Plateau:
    """The paper's rule: scale the rate by `factor` when the watched metric stopped improving.

    `update(value)` takes a validation metric where larger is better (top-1) and
    returns True when the rate should drop: `patience` evaluations in a row without
    a new best. Plain data, so the loop checkpoints it as JSON.
    """

    patience: int = 1
    factor: float = PAPER_LR_FACTOR
    best: float = -math.inf
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        if value > self.best:
            self.best, self.bad_evals = value, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.bad_evals = 0
            return True
        return False


def lr_for_recipe(
    recipe: str, lr: float, steps_per_epoch: int, *, step_epochs: int = LR_STEP_EPOCHS
) -> float | Callable:
    """The learning rate argument for `make_optimizer`: a StepLR schedule (torchvision) or a constant (paper)."""
    if recipe == "torchvision":
        return step_schedule(lr, steps_per_epoch, step_epochs=step_epochs)
    if recipe == "paper":
        return lr
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")


def default_weight_decay(recipe: str) -> float:
    """1e-4 for torchvision's recipe, 5e-4 for the paper's."""
    return PAPER_WEIGHT_DECAY if recipe == "paper" else WEIGHT_DECAY


# --- The training loop: data, steps, evaluation, checkpoints, metrics -------------------------

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
FINAL_VARIABLES_FILE = "final.msgpack"
CONFIG_FILE = "config.json"
COLOUR_PCA_FILE = "colour_pca.json"
CHECKPOINT_DIR = "checkpoints"
# What a finished run leaves: never replaced without --resume or --overwrite. (config.json
# alone is not a result: a run killed before its first checkpoint leaves nothing else.)
RESULT_FILES = (FINAL_VARIABLES_FILE, METRICS_FILE, CURVES_FILE)
# Fields that decide the trajectory: a resumed run must have the same ones to end where an
# uninterrupted run would. `epochs` may grow (StepLR does not depend on it); `workers` changes nothing.
_RUN_DEFINING = (
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


def _run_defining(config: TrainConfig) -> tuple[str, ...]:
    # The paper's recipe lowers the rate when val top-1 stalls, so there the val set (and how
    # it is evaluated) steers too.
    return _RUN_DEFINING + (("val_data", "eval_crops") if config.recipe == "paper" else ())


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


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
            check_image_size(self.image_size, self.arch)
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


def _initial_params(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    if config.init_from is None:
        return init_params(model, seed=config.seed, image_size=get_arch(config.arch).init_size)
    params = load_variables(config.init_from, device=False)["params"]
    # Weights of the other architecture would fail deep inside the first step: say so here.
    check_variables(params, config.arch)
    if params["classifier_6"]["kernel"].shape[1] != config.num_classes:
        # Fine-tuning: keep the body, draw a new head for this data set's classes.
        params = replace_head(params, config.num_classes, seed=config.seed)
    return params


def _prepare_workdir(workdir: Path, config: TrainConfig, resume: bool, latest: int | None) -> None:
    config_path = workdir / CONFIG_FILE
    if resume and latest is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to resume from (start without --resume)")
    if not resume and latest is not None:
        raise FileExistsError(
            f"{workdir}: already holds checkpoints up to step {latest}; pass --resume or use a new workdir "
            "(--overwrite deletes them)"
        )
    results = finished_results(workdir, RESULT_FILES)
    if not resume and results:
        raise FileExistsError(
            f"{workdir}: holds the results of a finished run ({', '.join(results)}) and no checkpoint to resume "
            "from; use a new workdir, or pass --overwrite to replace them"
        )
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        # A field missing from an older config.json had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = [
            f"{k} ({saved.get(k, defaults[k])!r} -> {getattr(config, k)!r})"
            for k in _run_defining(config)
            if saved.get(k, defaults[k]) != getattr(config, k)
        ]
        if changed:
            raise ValueError(f"{workdir}: cannot resume exactly with a different {', '.join(changed)}")
    if jax.process_index() == 0:
        atomic_write_bytes(config_path, (json.dumps(dataclasses.asdict(config), indent=2) + "\n").encode())


def _truncate_metrics(path: Path, step: int) -> None:
    # Lines written after the checkpoint we resume from would be written again: drop them,
    # and a last line torn by a kill mid-append (it was never followed by a checkpoint).
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if (_metrics_step(line) or math.inf) <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())  # a kill here keeps the old file


def _metrics_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _over_processes(*values: int) -> np.ndarray:
    """`values` from every process, shape (processes, len(values)); also a barrier across processes."""
    if jax.process_count() == 1:
        return np.asarray([values], np.int32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32))).reshape(-1, len(values))


def _sum_over_processes(value: int) -> int:
    # Each process reads only its shard of the data, so it sees only its own unreadable files.
    return int(_over_processes(value).sum())


@contextlib.contextmanager
def _own_workdir(workdir: Path, overwrite: bool):
    """Process 0 locks `workdir` for the run (and clears it for `overwrite`); every process learns the outcome."""
    lock, busy = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusyError as e:
            busy = e
    if _over_processes(busy is not None).any():
        raise busy or WorkdirBusyError(f"{workdir} is in use by another run (process 0 says by whom)")
    try:
        if overwrite:
            if jax.process_index() == 0:
                remove_results(workdir, (CHECKPOINT_DIR, CONFIG_FILE, *RESULT_FILES))
            _over_processes(0)  # the others wait until it is cleared
        yield
    finally:
        lock.release()


def evaluate(state: TrainState, batches, put: Callable[[dict], dict] = dict) -> dict[str, float]:
    """Mean loss, top-1 and top-5 over `batches` (from `data.eval_batches`), plus the count of skipped files.

    `put` places each batch for the state's devices (`Parallel.put_eval_batch`).
    """
    sums, skipped = [], 0
    for batch in batches:
        skipped += int(batch.pop("skipped"))
        sums.append(eval_step(state, put(batch)))
    return {**summarize_eval(jax.device_get(sums)), "skipped": _sum_over_processes(skipped)}


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train AlexNet on `config.data`, evaluate on `config.val_data` every epoch, checkpoint, log.

    Writes into `workdir`: checkpoints/ (Orbax; every `save_every` steps and each
    epoch's end; last `keep` and the best kept), metrics.jsonl (one line per
    evaluation), config.json, and at the end final.msgpack (`load_variables` reads
    it) and curves.png. `resume=True` continues from the latest checkpoint and ends
    with the same parameters as a run never interrupted; the latest checkpoint when
    intact, else the newest intact one. `overwrite=True` (without `resume`) deletes
    an earlier run's checkpoints and results first; without it they are never
    replaced. `on_checkpoint(step)` is called after each checkpoint is on disk
    (tests use it to kill the run).

    One run at a time owns `workdir` (`alexnet_jax.workdir.WorkdirLock`). SIGTERM
    or SIGINT (from the main thread) stop the run at the next step boundary with a
    checkpoint: StopRequested, whose `exit_status` is 128 + the signal number.
    `config.parallel` spreads each step over every device ("pmap", "sharded");
    across processes (after `parallel.initialize_distributed`) each reads only its
    shard of the data and only process 0 writes files besides the checkpoints,
    which Orbax writes together.
    **Returns:** the last metrics line, with "final_variables" added.
    **Raises:** DataError, FileNotFoundError/FileExistsError (workdir), WorkdirBusyError,
    OSError (a workdir that cannot be written), CheckpointError (a failed save, no intact
    checkpoint), ValueError (config), NonFiniteLossError, StopRequested.
    """
    config.validate()
    config = config.with_arch_defaults()
    # Before any data or weights are read: a batch that does not split is a usage error.
    parallel = make_parallel(config.parallel, global_batch=config.batch_size, micro_steps=config.micro_batches)
    train_data = image_folder(config.data)
    val_data = image_folder(config.val_data, classes=train_data.classes)
    config = config.resolved(len(train_data.classes))
    if config.num_classes < len(train_data.classes):
        raise ValueError(
            f"num-classes {config.num_classes} is less than the {len(train_data.classes)} class folders "
            f"in {config.data}"
        )
    per_epoch = steps_per_epoch(len(train_data), config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{config.data}: {len(train_data)} images is less than one batch of {config.batch_size}")

    workdir = check_writable_folder(workdir, "workdir")  # before hours of training, not after
    with _own_workdir(workdir, overwrite and not resume), StopSignals() as stop:
        checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, keep=config.keep)
        try:
            last = _train(
                config, workdir, checkpoints, parallel, train_data, val_data, per_epoch, resume, on_checkpoint, stop
            )
        except BaseException:
            # Also when the workdir, the weights or a restore are refused. A failed save
            # was already raised; closing must not replace the error being raised.
            with contextlib.suppress(Exception):
                checkpoints.close()
            raise
        checkpoints.close()
        return last


def _train(config, workdir, checkpoints, parallel, train_data, val_data, per_epoch, resume, on_checkpoint, stop):
    """The loop of `train_and_evaluate`, once it owns the workdir and its checkpoint manager exists."""
    primary, shard = jax.process_index() == 0, {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    total_steps = config.epochs * per_epoch
    _prepare_workdir(workdir, config, resume, checkpoints.latest_step())

    model = get_arch(config.arch).model(config.num_classes, config.conv_algorithm)
    tx = make_optimizer(
        lr_for_recipe(config.recipe, config.lr, per_epoch, step_epochs=config.lr_step_epochs),
        weight_decay=config.weight_decay,
        freeze_features=config.freeze_features,
        rule=RECIPE_RULES[config.recipe],
    )
    colour_pca = _colour_pca(config, train_data, workdir, primary)
    state = create_train_state(model, _initial_params(config, model), tx, seed=config.seed)
    loop: dict[str, Any] = {
        "epoch_loss": 0.0,
        "epoch_top1": 0.0,
        "epoch_steps": 0,
        "skipped": 0,
        "plateau": dataclasses.asdict(Plateau(patience=config.patience)),
    }
    metrics_path = workdir / METRICS_FILE
    if resume:
        state, loop = checkpoints.restore(state)
        if primary:
            _truncate_metrics(metrics_path, int(state.step))
    elif metrics_path.exists() and primary:
        metrics_path.unlink()
    state = parallel.put_state(state)
    plateau = Plateau(**loop["plateau"])
    step = first_step = int(state.step)

    def save(val_top1: float | None = None) -> None:
        record = {**loop, "plateau": dataclasses.asdict(plateau), "epoch": step // per_epoch}
        if checkpoints.save(state, record, val_top1=val_top1) and on_checkpoint is not None:
            checkpoints.wait()
            on_checkpoint(step)

    last: dict[str, Any] = {}
    bar = tqdm(
        total=total_steps, initial=step, unit="step", disable=not (config.progress and primary), dynamic_ncols=True
    )
    started, images = time.perf_counter(), 0
    batches = train_batches(
        train_data,
        batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=step,
        num_steps=total_steps,
        workers=config.workers,
        arch=config.arch,
        colour_pca=colour_pca,
        **shard,
    )
    try:
        for batch in batches:
            # One exchange per step tells every process the skipped files and whether any
            # process was asked to stop, so they all stop at the same step and save together.
            flags = _over_processes(int(batch.pop("skipped")), stop.received or 0)
            if flags[:, 1].any():
                saved = None
                if step > first_step or checkpoints.latest_step() == step:  # nothing trained: nothing to save
                    save()
                    checkpoints.wait()
                    saved = str(checkpoints.directory / str(step))
                raise StopRequested(int(flags[:, 1].max()), step, saved)
            # Counted once the batch is trained: a stopped run's resume reads this batch again.
            loop["skipped"] += int(flags[:, 0].sum())
            state, metrics = parallel.step(state, parallel.put_batch(batch))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                good = checkpoints.latest_step()
                kept = (
                    f"the last good checkpoint is step {good} in {checkpoints.directory}"
                    if good is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step + 1} (epoch {step // per_epoch + 1}); stopped, {kept}. "
                    "Try a lower --lr"
                )
            step += 1
            loop["epoch_loss"] += loss
            loop["epoch_top1"] += float(metrics["top1"])
            loop["epoch_steps"] += 1
            images += config.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images / (time.perf_counter() - started):.1f}")
            if step % per_epoch == 0:
                val = evaluate(
                    state,
                    eval_batches(
                        val_data,
                        batch_size=config.batch_size,
                        image_size=config.image_size,
                        workers=config.workers,
                        arch=config.arch,
                        crops=config.eval_crops,
                        **shard,
                    ),
                    parallel.put_eval_batch,
                )
                last = {
                    "step": step,
                    "epoch": step // per_epoch,
                    "train_loss": loop["epoch_loss"] / loop["epoch_steps"],
                    "train_top1": loop["epoch_top1"] / loop["epoch_steps"],
                    "val_loss": val["loss"],
                    "val_top1": val["top1"],
                    "val_top5": val["top5"],
                    "lr": float(metrics["lr"]),
                    "skipped_train": loop["skipped"],
                    "skipped_val": val["skipped"],
                }
                if config.recipe == "paper" and plateau.update(val["top1"]):
                    state = parallel.put_state(set_learning_rate(state, current_learning_rate(state) * plateau.factor))
                loop.update(epoch_loss=0.0, epoch_top1=0.0, epoch_steps=0)
                # The line goes out before the checkpoint: a run killed between the two
                # resumes before this epoch's end and drops the line (_truncate_metrics);
                # the other order would lose it for good.
                if primary:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.write(
                        f"epoch {last['epoch']}: train loss {last['train_loss']:.4f}, val loss {val['loss']:.4f}, "
                        f"top-1 {val['top1']:.4f}, top-5 {val['top5']:.4f}"
                    )
                save(val_top1=val["top1"])
            elif config.save_every and step % config.save_every == 0:
                save()
    finally:
        bar.close()
        # End the worker processes now, not when the generator is collected.
        batches.close()
    checkpoints.wait()
    final = workdir / FINAL_VARIABLES_FILE
    params = jax.device_get(state.params)  # replicated on every device, so each process holds them whole
    if primary:
        save_variables(final, {"params": params})
        plot_curves(metrics_path, workdir / CURVES_FILE)
    return {**last, "final_variables": str(final)}


def _colour_pca(config: TrainConfig, train_data: ImageFolder, workdir: Path, primary: bool) -> ColourPCA | None:
    """The run's colour noise; one computed from the folder is written to colour_pca.json."""
    choice = config.colour_pca or get_arch(config.arch).colour_pca
    if choice == "none":
        return None
    if choice == "imagenet":
        return IMAGENET_PCA
    # Deterministic in (folder, seed): a resumed run computes the same numbers again.
    pca = colour_pca_from_folder(train_data, seed=config.seed, progress=config.progress and primary)
    if primary:
        atomic_write_bytes(workdir / COLOUR_PCA_FILE, (json.dumps(dataclasses.asdict(pca), indent=2) + "\n").encode())
    return pca


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl file, as dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss (train and val) and val top-1/top-5 per epoch from metrics.jsonl, as a two-panel PNG."""
    # A Figure with the Agg canvas, not pyplot: no global backend is chosen or changed
    # (training machines have no display, and the caller may use another backend).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    left.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    right.plot(epochs, [r["val_top1"] for r in rows], "o-", label="val top-1")
    right.plot(epochs, [r["val_top5"] for r in rows], "o-", label="val top-5")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="validation accuracy")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return Path(png_path)
