"""Steps and optimizer: torch.optim.SGD parity, schedules, dropout keys, freezing, eval sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import AlexNet, flax_to_torch, replace_head
from alexnet_jax.steps import (
    create_train_state,
    current_learning_rate,
    eval_step,
    make_optimizer,
    scaled_lr,
    set_learning_rate,
    step_schedule,
    summarize_eval,
    train_step,
)
from alexnet_jax.training.recipe import Plateau

NUM_CLASSES = 7
SIZE = 64  # AlexNet's cheapest useful input (>= 63)

# Tests of the step's plumbing (keys, freezing, eval sums) run XLA's convolution, which
# compiles in a fraction of the Winograd layers' seconds; the torch SGD parity test runs
# the default path.
LOOP_TESTS_CONV = "xla"


def _batch(seed: int, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
        "mask": np.ones(n, np.float32),
    }


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def params(flax_variables):
    return _copy(flax_variables(0, NUM_CLASSES)["params"])


@pytest.mark.slow
@pytest.mark.torch
def test_two_steps_equal_torch_sgd_with_momentum_and_coupled_weight_decay(params):
    """Tolerance 1e-5 relative to each tensor's max: torch and XLA sum the conv/matmul gradients in different orders."""
    import torch

    from alexnet_jax.weights.reference import _vendored_alexnet_class

    lr, wd = 0.05, 0.01
    model = AlexNet(num_classes=NUM_CLASSES, dropout_rate=0.0)
    state = create_train_state(model, _copy(params), make_optimizer(lr, weight_decay=wd), seed=0)

    net = _vendored_alexnet_class()(num_classes=NUM_CLASSES, dropout=0.0)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch({"params": params}).items()})
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=wd)

    for seed in (1, 2):  # two steps: the second one reads the momentum buffer
        batch = _batch(seed)
        state, metrics = train_step(state, batch)
        opt.zero_grad()
        x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
        loss = torch.nn.functional.cross_entropy(net(x), torch.from_numpy(batch["label"]).long())
        loss.backward()
        opt.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)

    ours = flax_to_torch({"params": jax.device_get(state.params)})
    before = flax_to_torch({"params": params})
    for name, value in net.state_dict().items():
        theirs = value.numpy()
        assert not np.allclose(theirs, before[name]), f"{name} did not move; the comparison would be vacuous"
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(ours[name] / scale, theirs / scale, rtol=0, atol=1e-5, err_msg=name)
    assert int(state.step) == 2


def test_optimizer_matches_torch_formula_exactly_on_a_toy_tree():
    """The update rule itself, without a model: d = g + wd*p; buf = 0.9*buf + d; p -= lr*buf."""
    lr, wd, m = 0.1, 0.01, 0.9
    p = np.array([1.0, -2.0, 3.0], np.float32)
    grads = [np.array([0.5, 0.1, -0.2], np.float32), np.array([-0.3, 0.2, 0.4], np.float32)]
    tx = make_optimizer(lr, weight_decay=wd)
    params, opt_state = {"w": jnp.asarray(p)}, None
    opt_state = tx.init(params)
    ref, buf = p.astype(np.float64), np.zeros(3)
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        buf = m * buf + (g + wd * ref)
        ref = ref - lr * buf
    np.testing.assert_allclose(np.asarray(params["w"]), ref, rtol=1e-6)


def test_step_schedule_is_torchvision_steplr():
    schedule = step_schedule(0.01, steps_per_epoch=10, step_epochs=30)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(299)) == pytest.approx(0.01)  # epoch 29
    assert float(schedule(300)) == pytest.approx(0.001)  # epoch 30
    assert float(schedule(899)) == pytest.approx(1e-4)
    assert scaled_lr(256) == pytest.approx(0.01) and scaled_lr(64) == pytest.approx(0.0025)


def test_plateau_drops_only_after_patience_without_improvement():
    plateau = Plateau(patience=2)
    assert [plateau.update(v) for v in (0.1, 0.2, 0.2, 0.15, 0.3, 0.1, 0.1)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]


@pytest.mark.slow
def test_set_learning_rate_changes_the_next_update(params):
    model = AlexNet(num_classes=NUM_CLASSES)
    state = create_train_state(model, {"w": jnp.ones(3)}, make_optimizer(0.1, weight_decay=0.0), seed=0)
    state = set_learning_rate(state, 0.01)
    assert current_learning_rate(state) == pytest.approx(0.01)
    new = state.apply_gradients(grads={"w": jnp.ones(3)})
    np.testing.assert_allclose(np.asarray(new.params["w"]), 1 - 0.01, rtol=1e-6)


@pytest.mark.slow
def test_dropout_key_depends_on_step_only(params):
    """Same state and batch at the same step give the same result; a different step gives another mask."""
    model = AlexNet(num_classes=NUM_CLASSES, conv_algorithm=LOOP_TESTS_CONV)

    def make(step):
        return create_train_state(model, _copy(params), make_optimizer(0.01), seed=3).replace(step=step)

    batch = _batch(5)
    _, a = train_step(make(0), batch)
    _, b = train_step(make(0), batch)
    _, c = train_step(make(1), batch)
    assert float(a["loss"]) == float(b["loss"])
    assert float(a["loss"]) != float(c["loss"])


@pytest.mark.slow
def test_freeze_features_updates_only_the_classifier(params):
    model = AlexNet(num_classes=NUM_CLASSES, conv_algorithm=LOOP_TESTS_CONV)
    state = create_train_state(model, _copy(params), make_optimizer(0.05, freeze_features=True), seed=0)
    state, _ = train_step(state, _batch(1))
    new = jax.device_get(state.params)
    for layer in params:
        same = all(np.array_equal(new[layer][k], params[layer][k]) for k in params[layer])
        assert same == layer.startswith("features_"), layer


@pytest.mark.slow  # test_model's replace_head test is the fast one
def test_replace_head_keeps_the_body_and_resizes_the_head(params):
    new = replace_head(params, 3, seed=0)
    assert new["classifier_6"]["kernel"].shape == (4096, 3) and new["classifier_6"]["bias"].shape == (3,)
    assert new["features_0"] is params["features_0"]
    assert float(jnp.std(new["classifier_6"]["kernel"])) == pytest.approx((1 / 4096) ** 0.5, rel=0.1)


@pytest.mark.slow  # the loop tests run eval_step on the tiny network in the fast loop
def test_eval_step_sums_ignore_masked_examples(params):
    model = AlexNet(num_classes=NUM_CLASSES, conv_algorithm=LOOP_TESTS_CONV)
    state = create_train_state(model, _copy(params), make_optimizer(0.01), seed=0)
    batch = _batch(7, n=6)
    logits = np.asarray(model.apply({"params": params}, batch["image"]))
    masked = dict(batch, mask=np.array([1, 1, 1, 1, 0, 0], np.float32))
    got = summarize_eval([eval_step(state, masked)])
    expected_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:4], batch["label"][:4]).mean()
    order = np.argsort(-logits[:4], axis=1)
    assert got["count"] == 4
    assert got["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert got["top1"] == pytest.approx(np.mean(order[:, 0] == batch["label"][:4]))
    assert got["top5"] == pytest.approx(np.mean([label in o[:5] for label, o in zip(batch["label"][:4], order)]))


def test_summarize_eval_refuses_an_empty_evaluation():
    with pytest.raises(ValueError, match="no validation example"):
        summarize_eval([{"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}])
