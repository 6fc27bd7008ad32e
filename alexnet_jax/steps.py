"""The pure pieces of training: the train state, torch-style SGD, the jitted steps.

    state = create_train_state(AlexNet(num_classes=10), params, make_optimizer(0.01), seed=0)
    state, metrics = train_step(state, batch)       # jitted, `state` donated
    sums = eval_step(state, batch)                  # loss / top-1 / top-5 sums

A batch is a dict of numpy or jax arrays: `image` (N, H, W, 3), either uint8 pixels (what the
training pipeline hands over; normalized here, on the device, by `model_inputs`) or float32
normalized as `alexnet_jax.transforms.preprocess` does; `label` int32 (N,); `mask` float32 (N,)
with 0 for padding and for images that could not be read (they count for nothing); optionally
`colour` float32 (N, 3), the paper's colour noise per image, added after normalizing. Everything
here needs only the core dependencies; `alexnet_jax.training.loop` drives it (data,
evaluation, checkpoints, metrics) and `alexnet_jax.distributed.parallel` spreads it over devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from alexnet_jax.transforms.preprocess import MEAN_RGB, STDDEV_RGB

# torchvision's reference recipe (references/classification, AlexNet row): SGD, momentum 0.9,
# lr 0.01 for 256 images per step (8 GPUs x 32), x0.1 every 30 epochs, 90 epochs, wd 1e-4.
MOMENTUM = 0.9
BASE_LR = 0.01
BASE_BATCH_SIZE = 256
LR_STEP_EPOCHS = 30
LR_GAMMA = 0.1
EPOCHS = 90
WEIGHT_DECAY = 1e-4
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
    lr: float,
    steps_per_epoch: int,
    *,
    step_epochs: int = LR_STEP_EPOCHS,
    gamma: float = LR_GAMMA,
    epoch_base: tuple[int, int] = (0, 0),
) -> optax.Schedule:
    """torchvision's StepLR per epoch, as a function of the optimizer step: lr * gamma**(epoch // step_epochs).

    `epoch_base` (step, epoch): the epochs of `steps_per_epoch` steps count from that step, as
    that epoch (a run resumed on data of another size); steps before it are not asked for.
    """
    if tuple(epoch_base) == (0, 0):
        return optax.exponential_decay(
            lr, transition_steps=step_epochs * steps_per_epoch, decay_rate=gamma, staircase=True
        )
    base_step, base_epoch = epoch_base

    def schedule(count):
        epoch = base_epoch + (jnp.asarray(count) - base_step) // steps_per_epoch
        return lr * jnp.power(jnp.float32(gamma), (epoch // step_epochs).astype(jnp.float32))

    return schedule


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


class VelocityState(NamedTuple):
    """The paper's momentum variable v, in units of a parameter change (one array per parameter)."""

    velocity: Any


def sgd_paper(learning_rate: float, momentum: float = MOMENTUM, weight_decay: float = 0.0):
    """Krizhevsky et al. (2012), section 5, exactly: v <- m v - wd lr w - lr dL/dw; w <- w + v.

    With a constant rate this is `sgd_torch` (v = -lr * torch's buffer). They differ when
    the rate changes: torch's buffer is a sum of gradients, so the next step scales the whole
    history by the new rate at once; the paper's v is a parameter change, so the steps taken
    at the old rate fade out through m. The paper's recipe divides the rate by 10 mid-run,
    so it gets the paper's rule (`make_optimizer(rule="paper")`). `learning_rate` is a
    number (under `inject_hyperparams`, the current one).
    """

    def init(params):
        return VelocityState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        if params is None:
            raise ValueError("sgd_paper needs the parameters (weight decay): pass them to update()")
        velocity = jax.tree.map(
            lambda v, g, w: (momentum * v - learning_rate * (weight_decay * w + g)).astype(v.dtype),
            state.velocity,
            grads,
            params,
        )
        return velocity, VelocityState(velocity)

    return optax.GradientTransformation(init, update)


# Momentum rules: `sgd_torch` (torchvision's recipe) and `sgd_paper` (the 2012 paper's).
UPDATE_RULES = {"torch": sgd_torch, "paper": sgd_paper}


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
    rule: str = "torch",
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay whose current learning rate lives in the optimizer state.

    `rule` is the momentum formulation, a key of UPDATE_RULES: "torch" (`sgd_torch`,
    torch.optim.SGD) or "paper" (`sgd_paper`, the 2012 paper's velocity).

    The rate is an injected hyperparameter (`opt_state.hyperparams["learning_rate"]`),
    so it is checkpointed with the state and the paper's plateau rule can change it
    between epochs (`set_learning_rate`). `freeze_features` leaves the conv layers
    untouched (no update, no decay) with `optax.multi_transform`.
    """

    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}; expected one of {', '.join(UPDATE_RULES)}")

    def factory(learning_rate):
        tx = UPDATE_RULES[rule](learning_rate, momentum, weight_decay)
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


# The keys of a batch that go to the device (a pipeline's batch also counts its skipped files).
BATCH_KEYS = ("image", "label", "mask", "colour")


def device_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The arrays of `batch` the steps read (BATCH_KEYS that are present), for placing on devices."""
    return {k: batch[k] for k in BATCH_KEYS if k in batch}


def model_inputs(batch: Mapping[str, jax.Array]) -> jax.Array:
    """The model's input for `batch`: uint8 pixels normalized as `preprocess.normalize` does, plus `colour`.

    The same float32 operations in the same order as the host's `normalize` (x / 255, minus
    the mean, over the standard deviation), so a batch normalized here equals one normalized
    on the host to float32 rounding. Float images are taken as normalized already. `colour`
    (N, 3), the paper's noise on the normalized scale, is added to every pixel of its image.
    **Returns:** float32 (N, ..., H, W, 3).
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / jnp.float32(255)
        images = (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STDDEV_RGB, jnp.float32)
    if "colour" in batch:
        colour = batch["colour"].astype(jnp.float32)
        images = images + colour.reshape(colour.shape[:1] + (1,) * (images.ndim - 2) + colour.shape[1:])
    return images


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
        logits = state.apply_fn({"params": params}, model_inputs(micro), train=True, rngs={"dropout": key})
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


def crop_averaged_logits(logits: jax.Array, crops: int) -> jax.Array:
    """The log of the softmax averaged over each image's crops (the paper's ten-crop test).

    Log-probabilities are logits whose softmax is the averaged probability, so the
    cross-entropy and top-k of the result are those of the average.
    **Arguments:** logits (N * crops, C), the crops of an image consecutive.
    **Returns:** float32 (N, C).
    """
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.log(jnp.mean(probabilities.reshape((-1, crops) + logits.shape[1:]), axis=1))


@jax.jit
def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and accuracy of one batch with dropout off, as sums so batches add up.

    **Arguments:** batch with image (N, H, W, 3) (uint8 pixels or normalized floats, see
    `model_inputs`), or (N, crops, H, W, 3) for a multi-crop evaluation (the softmax averaged
    over the crops: `crop_averaged_logits`), label (N,), mask (N,).
    **Returns:** {"loss", "top1", "top5", "count"}: the summed cross-entropy, the
    numbers of examples right at top-1 and top-5, and the number of examples with
    mask 1. Divide by the total count (`summarize_eval`) for means.
    """
    mask = batch["mask"].astype(jnp.float32)
    images = model_inputs(batch)
    if images.ndim == 5:
        n, crops = images.shape[:2]
        logits = state.apply_fn({"params": state.params}, images.reshape((n * crops,) + images.shape[2:]), train=False)
        logits = crop_averaged_logits(logits, crops)
    else:
        logits = state.apply_fn({"params": state.params}, images, train=False)
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
