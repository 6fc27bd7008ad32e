"""Training pieces: the train state, torch-style SGD, learning-rate recipes, jitted steps.

    state = create_train_state(AlexNet(num_classes=10), params, make_optimizer(0.01), seed=0)
    state, metrics = train_step(state, batch)       # jitted, `state` donated
    sums = eval_step(state, batch)                  # loss / top-1 / top-5 sums

A batch is a dict of numpy or jax arrays: `image` float32 (N, H, W, 3) normalized as
`alexnet_jax.preprocess` does, `label` int32 (N,), `mask` float32 (N,) with 0 for
padding and for images that could not be read (they count for nothing).
`train_and_evaluate` drives them: data, evaluation, checkpoints, metrics, curves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from .io import atomic_write_bytes
from .model import check_conv_algorithm, replace_head

# torchvision's reference recipe (references/classification, AlexNet row): SGD, momentum 0.9,
# lr 0.01 for 256 images per step (8 GPUs x 32), x0.1 every 30 epochs, 90 epochs, wd 1e-4.
MOMENTUM = 0.9
BASE_LR = 0.01
BASE_BATCH_SIZE = 256
LR_STEP_EPOCHS = 30
LR_GAMMA = 0.1
EPOCHS = 90
WEIGHT_DECAY = 1e-4
# The 2012 paper (Krizhevsky et al., section 5): wd 5e-4, lr divided by 10 whenever the
# validation error stopped improving at the current rate.
PAPER_WEIGHT_DECAY = 5e-4
PAPER_LR_FACTOR = 0.1

RECIPES = ("torchvision", "paper")
TOP_K = 5


class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, opt_state, apply_fn, tx) plus the run's root key.

    `rng` is a raw uint32 key of shape (2,); the dropout key of step t is
    `fold_in(rng, t)`, so it depends on nothing but the seed and the step.
    """

    rng: jax.Array


def scaled_lr(batch_size: int, base_lr: float = BASE_LR, base_batch_size: int = BASE_BATCH_SIZE) -> float:
    """The linear scaling rule: `base_lr` is for `base_batch_size` images per step."""
    return base_lr * batch_size / base_batch_size


def step_schedule(
    lr: float, steps_per_epoch: int, *, step_epochs: int = LR_STEP_EPOCHS, gamma: float = LR_GAMMA
) -> optax.Schedule:
    """torchvision's StepLR per epoch, as a function of the optimizer step: lr * gamma**(epoch // step_epochs)."""
    return optax.exponential_decay(
        lr, transition_steps=step_epochs * steps_per_epoch, decay_rate=gamma, staircase=True
    )


def sgd_torch(learning_rate: float | optax.Schedule, momentum: float = MOMENTUM, weight_decay: float = 0.0):
    """`torch.optim.SGD(lr, momentum, weight_decay)` (no dampening, no Nesterov) in Optax.

    torch adds `weight_decay * p` to the gradient *before* the momentum buffer
    (coupled decay, unlike AdamW), and its first buffer is the gradient itself,
    which is what optax's trace gives from a zero start.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum if momentum else None),
    )


def _is_conv(path: tuple[str, ...]) -> bool:
    return path[0].startswith("features_")


def freeze_labels(params: Mapping[str, Any]) -> Any:
    """'frozen' for every leaf of the conv layers (features_*), 'trained' for the classifier."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: "frozen" if _is_conv(k) else "trained" for k in flat})


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    freeze_features: bool = False,
) -> optax.GradientTransformation:
    """torch-style SGD whose current learning rate lives in the optimizer state.

    The rate is an injected hyperparameter (`opt_state.hyperparams["learning_rate"]`),
    so it is checkpointed with the state and the paper's plateau rule can change it
    between epochs (`set_learning_rate`). `freeze_features` leaves the conv layers
    untouched (no update, no decay) with `optax.multi_transform`.
    """

    def factory(learning_rate):
        tx = sgd_torch(learning_rate, momentum, weight_decay)
        if freeze_features:
            tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, freeze_labels)
        return tx

    return optax.inject_hyperparams(factory)(learning_rate=learning_rate)


def current_learning_rate(state: TrainState) -> float:
    """The rate the last update used (for a schedule) or the next one will use (a constant)."""
    return float(state.opt_state.hyperparams["learning_rate"])


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
    """A state whose optimizer uses `lr` from now on (only meaningful for a constant rate)."""
    hyperparams = dict(state.opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


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


def create_train_state(
    model: nn.Module, params: Mapping[str, Any], tx: optax.GradientTransformation, *, seed: int
) -> TrainState:
    """A step-0 state for `model` with `params` (the `"params"` collection) and optimizer `tx`."""
    # A copy: train_step donates the state, which would delete the caller's own arrays.
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), dict(params))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.PRNGKey(seed))


def init_params(model: nn.Module, *, seed: int, image_size: int = 63) -> dict[str, Any]:
    """Freshly initialized `"params"` for `model` (the image size does not change their shapes)."""
    init = jax.jit(model.init)
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3), model.param_dtype))["params"]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, count: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy over the examples with mask 1 (torch's CrossEntropyLoss when all are 1).

    `count` replaces the number of examples with mask 1 as the divisor: a shard of a
    global batch divides by the global count, so the shards' results add up to the
    global mean (a mean of per-shard means would weigh a padded shard wrongly).
    **Arguments:** logits (N, C), labels int (N,), mask float (N,), count a scalar.
    **Returns:** a scalar.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    if count is None:
        count = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(losses * mask) / count


def _correct(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Per example: label is the top-1 class; label is among the top min(5, C) classes.
    _, top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
    return (top[:, 0] == labels).astype(jnp.float32), jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def dropout_key(rng: jax.Array, step: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The dropout key of `step`: `fold_in(rng, step)`, and under `pmap` also folded with the device's index
    along `axis_name`, so no two devices draw the same masks.
    """
    key = jax.random.fold_in(rng, step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key


def split_micro_batches(batch: Mapping[str, jax.Array], micro_steps: int) -> dict[str, jax.Array]:
    """The batch as `micro_steps` micro-batches: example i goes to micro-batch i % micro_steps.

    Strided rather than contiguous so that, with the batch sharded over devices in
    contiguous blocks, every micro-batch keeps an equal part on every device.
    **Arguments:** arrays of leading size N, a multiple of `micro_steps`.
    **Returns:** arrays of shape (micro_steps, N // micro_steps, ...).
    """
    n = batch["label"].shape[0]
    if n % micro_steps:
        raise ValueError(f"a batch of {n} does not split into {micro_steps} micro-batches")
    return {k: jnp.swapaxes(v.reshape((n // micro_steps, micro_steps) + v.shape[1:]), 0, 1) for k, v in batch.items()}


def apply_step(
    state: TrainState, batch: Mapping[str, jax.Array], *, axis_name: str | None = None, micro_steps: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The math of one SGD step with dropout on, unjitted: `train_step`, `pmap` and the sharded jit all run it.

    The loss is the masked mean over the global batch, sum(loss * mask) / sum(mask).
    Under `pmap` (`axis_name` set) each device holds a shard: it divides its sum by
    the psum of the counts and the psum of the results is the global mean, also
    when the shards hold different numbers of padded examples. With `micro_steps`
    > 1 the gradients of the micro-batches are summed in a `lax.scan`, with the
    same divisor, so they equal the gradient of the whole batch.
    **Arguments:** batch with image (N, H, W, 3), label (N,), mask (N,): the
    global batch, or under `pmap` this device's shard.
    **Returns:** (new state, {"loss", "top1", "lr"}) as scalars.
    """
    count = jnp.sum(batch["mask"].astype(jnp.float32))
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    count = jnp.maximum(count, 1.0)
    key = dropout_key(state.rng, state.step, axis_name)

    def loss_fn(params, micro, key):
        mask = micro["mask"].astype(jnp.float32)
        logits = state.apply_fn({"params": params}, micro["image"], train=True, rngs={"dropout": key})
        top1, _ = _correct(logits, micro["label"])
        return cross_entropy(logits, micro["label"], mask, count), jnp.sum(top1 * mask)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_steps == 1:
        (loss, correct), grads = grad_fn(state.params, batch, key)
    else:

        def accumulate(total, xs):
            i, micro = xs
            (loss, correct), grads = grad_fn(state.params, micro, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, total, (loss, correct, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        micro = split_micro_batches(batch, micro_steps)
        (loss, correct, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_steps), micro))
    if axis_name is not None:
        loss, correct, grads = jax.lax.psum((loss, correct, grads), axis_name)
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss, "top1": correct / count, "lr": state.opt_state.hyperparams["learning_rate"]}


@functools.partial(jax.jit, donate_argnums=0, static_argnames="micro_steps")
def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], micro_steps: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on one device with dropout on. Pure: the dropout key is `fold_in(state.rng, state.step)`.

    **Arguments:** state (donated: its buffers are reused, do not touch it after the
    call); batch with image (N, H, W, 3), label (N,), mask (N,); `micro_steps`
    micro-batches of N // micro_steps images accumulated into one update.
    **Returns:** (new state, {"loss", "top1", "lr"}) as scalars; loss and top1 are
    means over the examples with mask 1, lr the rate this step used.
    """
    return apply_step(state, batch, micro_steps=micro_steps)


@jax.jit
def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and accuracy of one batch with dropout off, as sums so batches add up.

    **Returns:** {"loss", "top1", "top5", "count"}: the summed cross-entropy, the
    numbers of examples right at top-1 and top-5, and the number of examples with
    mask 1. Divide by the total count (`summarize_eval`) for means.
    """
    mask = batch["mask"].astype(jnp.float32)
    logits = state.apply_fn({"params": state.params}, batch["image"], train=False)
    top1, top5 = _correct(logits, batch["label"])
    return {
        "loss": cross_entropy(logits, batch["label"], mask, count=1.0),  # the sum: divided by 1
        "top1": jnp.sum(top1 * mask),
        "top5": jnp.sum(top5 * mask),
        "count": jnp.sum(mask),
    }


def summarize_eval(sums: list[Mapping[str, Any]]) -> dict[str, float]:
    """Means over batches of `eval_step` results: {"loss", "top1", "top5", "count"} (top-k as fractions)."""
    total = {k: float(np.sum([float(s[k]) for s in sums])) for k in ("loss", "top1", "top5", "count")}
    n = total["count"]
    if n == 0:
        raise ValueError("no validation example could be read")
    return {"loss": total["loss"] / n, "top1": total["top1"] / n, "top5": total["top5"] / n, "count": int(n)}


def lr_for_recipe(recipe: str, lr: float, steps_per_epoch: int, *, step_epochs: int = LR_STEP_EPOCHS) -> float | Callable:
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
CHECKPOINT_DIR = "checkpoints"
# Fields that decide the trajectory: a resumed run must have the same ones to end where an
# uninterrupted run would. `epochs` may grow (StepLR does not depend on it); `workers` changes nothing.
_RUN_DEFINING = (
    "data", "batch_size", "image_size", "seed", "recipe", "lr", "weight_decay", "lr_step_epochs",
    "patience", "num_classes", "init_from", "freeze_features", "parallel", "micro_batches",
)


def _run_defining(config: "TrainConfig") -> tuple[str, ...]:
    # The paper's recipe lowers the rate when val top-1 stalls, so there the val set steers too.
    return _RUN_DEFINING + (("val_data",) if config.recipe == "paper" else ())


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainConfig:
    """One training run. `lr=None` means `scaled_lr(batch_size)`; `weight_decay=None` the recipe's."""

    data: str
    val_data: str
    epochs: int = EPOCHS
    batch_size: int = BASE_BATCH_SIZE
    lr: float | None = None
    image_size: int = 224
    init_from: str | None = None
    num_classes: int | None = None  # default: the number of class folders
    seed: int = 0
    recipe: str = "torchvision"
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
    # AlexNet's conv_algorithm. Not run-defining: the algorithms compute the same function and
    # differ in rounding only (a switch on resume is no longer bit-exact, nothing more).
    conv_algorithm: str = "auto"

    def resolved(self, num_class_folders: int) -> TrainConfig:
        """A copy with the defaults that depend on the data and the recipe filled in, and paths made absolute."""
        return dataclasses.replace(
            self,
            data=str(Path(self.data).absolute()),
            val_data=str(Path(self.val_data).absolute()),
            init_from=None if self.init_from is None else str(Path(self.init_from).absolute()),
            lr=scaled_lr(self.batch_size) if self.lr is None else self.lr,
            weight_decay=default_weight_decay(self.recipe) if self.weight_decay is None else self.weight_decay,
            num_classes=num_class_folders if self.num_classes is None else self.num_classes,
        )


def _check_config(config: TrainConfig) -> None:
    from .data import check_image_size

    check_image_size(config.image_size)
    for name in ("epochs", "batch_size", "keep", "patience", "lr_step_epochs", "micro_batches"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.save_every < 0 or config.workers < 0:
        raise ValueError("save-every and workers must be at least 0")
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; expected one of {', '.join(RECIPES)}")
    if config.lr is not None and not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    check_conv_algorithm(config.conv_algorithm)


def _initial_params(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    from .io import load_variables

    if config.init_from is None:
        return init_params(model, seed=config.seed)
    params = load_variables(config.init_from, device=False)["params"]
    if params["classifier_6"]["kernel"].shape[1] != config.num_classes:
        # Fine-tuning: keep the body, draw a new head for this data set's classes.
        params = replace_head(params, config.num_classes, seed=config.seed)
    return params


def _prepare_workdir(workdir: Path, config: TrainConfig, resume: bool, latest: int | None) -> None:
    config_path = workdir / CONFIG_FILE
    if resume and latest is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to resume from (start without --resume)")
    if not resume and latest is not None:
        raise FileExistsError(f"{workdir}: already holds checkpoints up to step {latest}; pass --resume or use a new workdir")
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text())
        # A field missing from an older config.json had its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = [
            f"{k} ({saved.get(k, defaults[k])!r} -> {getattr(config, k)!r})"
            for k in _run_defining(config) if saved.get(k, defaults[k]) != getattr(config, k)
        ]
        if changed:
            raise ValueError(f"{workdir}: cannot resume exactly with a different {', '.join(changed)}")
    if jax.process_index() == 0:
        atomic_write_bytes(config_path, (json.dumps(dataclasses.asdict(config), indent=2) + "\n").encode())


def _truncate_metrics(path: Path, step: int) -> None:
    # Lines written after the checkpoint we resume from would be written again: drop them.
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())  # a kill here keeps the old file


def _sum_over_processes(value: int) -> int:
    # Each process reads only its shard of the data, so it sees only its own unreadable files.
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(value))))


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
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train AlexNet on `config.data`, evaluate on `config.val_data` every epoch, checkpoint, log.

    Writes into `workdir`: checkpoints/ (Orbax; every `save_every` steps and each
    epoch's end; last `keep` and the best kept), metrics.jsonl (one line per
    evaluation), config.json, and at the end final.msgpack (`load_variables` reads
    it) and curves.png. `resume=True` continues from the latest checkpoint and ends
    with the same parameters as a run never interrupted. `on_checkpoint(step)` is
    called after each checkpoint is on disk (tests use it to kill the run).
    `config.parallel` spreads each step over every device ("pmap", "sharded");
    across processes (after `parallel.initialize_distributed`) each reads only its
    shard of the data and only process 0 writes files besides the checkpoints,
    which Orbax writes together.
    **Returns:** the last metrics line, with "final_variables" added.
    **Raises:** DataError, FileNotFoundError/FileExistsError (workdir), ValueError
    (config), NonFiniteLossError.
    """
    from .checkpoint import Checkpoints
    from .data import image_folder, steps_per_epoch
    from .parallel import make_parallel

    _check_config(config)
    # Before any data or weights are read: a batch that does not split is a usage error.
    parallel = make_parallel(config.parallel, global_batch=config.batch_size, micro_steps=config.micro_batches)
    train_data = image_folder(config.data)
    val_data = image_folder(config.val_data, classes=train_data.classes)
    config = config.resolved(len(train_data.classes))
    if config.num_classes < len(train_data.classes):
        raise ValueError(f"num-classes {config.num_classes} is less than the {len(train_data.classes)} class folders in {config.data}")
    per_epoch = steps_per_epoch(len(train_data), config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{config.data}: {len(train_data)} images is less than one batch of {config.batch_size}")

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, keep=config.keep)
    try:
        return _train(config, workdir, checkpoints, parallel, train_data, val_data, per_epoch, resume, on_checkpoint)
    finally:
        checkpoints.close()  # also when the workdir, the weights or a restore are refused


def _train(config, workdir, checkpoints, parallel, train_data, val_data, per_epoch, resume, on_checkpoint):
    """The loop of `train_and_evaluate`, once its checkpoint manager exists."""
    from tqdm import tqdm

    from .data import eval_batches, train_batches
    from .io import save_variables
    from .model import AlexNet

    primary, shard = jax.process_index() == 0, {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    total_steps = config.epochs * per_epoch
    _prepare_workdir(workdir, config, resume, checkpoints.latest_step())

    model = AlexNet(num_classes=config.num_classes, conv_algorithm=config.conv_algorithm)
    tx = make_optimizer(
        lr_for_recipe(config.recipe, config.lr, per_epoch, step_epochs=config.lr_step_epochs),
        weight_decay=config.weight_decay,
        freeze_features=config.freeze_features,
    )
    state = create_train_state(model, _initial_params(config, model), tx, seed=config.seed)
    loop: dict[str, Any] = {"epoch_loss": 0.0, "epoch_top1": 0.0, "epoch_steps": 0, "skipped": 0,
                            "plateau": dataclasses.asdict(Plateau(patience=config.patience))}
    metrics_path = workdir / METRICS_FILE
    if resume:
        state, loop = checkpoints.restore(state)
        if primary:
            _truncate_metrics(metrics_path, int(state.step))
    elif metrics_path.exists() and primary:
        metrics_path.unlink()
    state = parallel.put_state(state)
    plateau = Plateau(**loop["plateau"])
    step = int(state.step)

    def save(val_top1: float | None = None) -> None:
        record = {**loop, "plateau": dataclasses.asdict(plateau), "epoch": step // per_epoch}
        if checkpoints.save(state, record, val_top1=val_top1) and on_checkpoint is not None:
            checkpoints.wait()
            on_checkpoint(step)

    last: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (config.progress and primary), dynamic_ncols=True)
    started, images = time.perf_counter(), 0
    batches = train_batches(
        train_data, batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
        start_step=step, num_steps=total_steps, workers=config.workers, **shard,
    )
    try:
        for batch in batches:
            loop["skipped"] += _sum_over_processes(int(batch.pop("skipped")))
            state, metrics = parallel.step(state, parallel.put_batch(batch))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                good = checkpoints.latest_step()
                kept = f"the last good checkpoint is step {good} in {checkpoints.directory}" if good is not None else "no checkpoint was written yet"
                raise NonFiniteLossError(f"loss is {loss} at step {step + 1} (epoch {step // per_epoch + 1}); stopped, {kept}. Try a lower --lr")
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
                    eval_batches(val_data, batch_size=config.batch_size, image_size=config.image_size, workers=config.workers, **shard),
                    parallel.put_eval_batch,
                )
                last = {
                    "step": step, "epoch": step // per_epoch,
                    "train_loss": loop["epoch_loss"] / loop["epoch_steps"],
                    "train_top1": loop["epoch_top1"] / loop["epoch_steps"],
                    "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                    "lr": float(metrics["lr"]), "skipped_train": loop["skipped"], "skipped_val": val["skipped"],
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
        checkpoints.wait()
    final = workdir / FINAL_VARIABLES_FILE
    params = jax.device_get(state.params)  # replicated on every device, so each process holds them whole
    if primary:
        save_variables(final, {"params": params})
        plot_curves(metrics_path, workdir / CURVES_FILE)
    return {**last, "final_variables": str(final)}


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
