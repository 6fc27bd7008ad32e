"""Training pieces: the train state, torch-style SGD, learning-rate recipes, jitted steps.

    state = create_train_state(AlexNet(num_classes=10), params, make_optimizer(0.01), seed=0)
    state, metrics = train_step(state, batch)       # jitted, `state` donated
    sums = eval_step(state, batch)                  # loss / top-1 / top-5 sums

A batch is a dict of numpy or jax arrays: `image` float32 (N, H, W, 3) normalized as
`alexnet_jax.preprocess` does, `label` int32 (N,), `mask` float32 (N,) with 0 for
padding and for images that could not be read (they count for nothing).
The loop that drives these (data, checkpoints, metrics) is `alexnet_jax.loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from .model import HIDDEN

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
    params = jax.tree.map(jnp.asarray, dict(params))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=jax.random.PRNGKey(seed))


def init_params(model: nn.Module, *, seed: int, image_size: int = 63) -> dict[str, Any]:
    """Freshly initialized `"params"` for `model` (the image size does not change their shapes)."""
    init = jax.jit(model.init)
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3), model.param_dtype))["params"]


def replace_head(params: Mapping[str, Any], num_classes: int, *, seed: int) -> dict[str, Any]:
    """`params` with classifier_6 re-initialized for `num_classes` outputs (fine-tuning).

    The new head is an `nn.Dense` with the initializers AlexNet's own head has
    (LeCun-normal kernel, zero bias), drawn from `seed`.
    **Returns:** a new dict; classifier_6 kernel (4096, num_classes), bias (num_classes,).
    """
    kernel = params["classifier_6"]["kernel"]
    head = nn.Dense(num_classes, param_dtype=kernel.dtype).init(
        jax.random.PRNGKey(seed), jnp.zeros((1, HIDDEN), kernel.dtype)
    )["params"]
    return {**params, "classifier_6": head}


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the examples with mask 1 (torch's CrossEntropyLoss when all are 1).

    **Arguments:** logits (N, C), labels int (N,), mask float (N,). **Returns:** a scalar.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _correct(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Per example: label is the top-1 class; label is among the top min(5, C) classes.
    _, top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
    return (top[:, 0] == labels).astype(jnp.float32), jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step with dropout on. Pure: the dropout key is `fold_in(state.rng, state.step)`.

    **Arguments:** state (donated: its buffers are reused, do not touch it after the
    call); batch with image (N, H, W, 3), label (N,), mask (N,).
    **Returns:** (new state, {"loss", "top1", "lr"}) as scalars; loss and top1 are
    means over the examples with mask 1, lr the rate this step used.
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    mask = batch["mask"].astype(jnp.float32)

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["image"], train=True, rngs={"dropout": dropout_rng})
        return cross_entropy(logits, batch["label"], mask), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    top1, _ = _correct(logits, batch["label"])
    metrics = {
        "loss": loss,
        "top1": jnp.sum(top1 * mask) / jnp.maximum(jnp.sum(mask), 1.0),
        "lr": state.opt_state.hyperparams["learning_rate"],
    }
    return state, metrics


@jax.jit
def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and accuracy of one batch with dropout off, as sums so batches add up.

    **Returns:** {"loss", "top1", "top5", "count"}: the summed cross-entropy, the
    numbers of examples right at top-1 and top-5, and the number of examples with
    mask 1. Divide by the total count (`summarize_eval`) for means.
    """
    mask = batch["mask"].astype(jnp.float32)
    logits = state.apply_fn({"params": state.params}, batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
    top1, top5 = _correct(logits, batch["label"])
    return {
        "loss": jnp.sum(losses * mask),
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
