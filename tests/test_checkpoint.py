"""Orbax checkpoints: exact round trip of the train state, last-k-and-best retention, clear errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.checkpoint import CheckpointError, Checkpoints
from alexnet_jax.steps import (
    create_train_state,
    current_learning_rate,
    make_optimizer,
    set_learning_rate,
)


def _state(seed: int = 0, lr: float = 0.1):
    model = nn.Dense(3)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))["params"]
    return create_train_state(model, params, make_optimizer(lr, weight_decay=1e-2), seed=seed)


def _step(state, k: int):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (k + 1)), state.params)
    return state.apply_gradients(grads=grads)


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )


def test_restore_gives_back_params_momentum_lr_step_and_rng_exactly(tmp_path):
    state = _state(seed=4)
    for k in range(3):
        state = _step(state, k)
    state = set_learning_rate(state, 0.0125)
    checkpoints = Checkpoints(tmp_path / "ck")
    assert checkpoints.save(state, {"epoch": 1, "note": "x"})
    checkpoints.close()

    restored, loop = Checkpoints(tmp_path / "ck").restore(_state(seed=9, lr=0.5))
    assert int(restored.step) == 3
    assert loop == {"epoch": 1, "note": "x", "val_top1": None}
    assert _leaves_equal(restored.params, state.params)
    assert _leaves_equal(restored.opt_state, state.opt_state)  # momentum buffers and hyperparameters
    assert current_learning_rate(restored) == pytest.approx(0.0125)
    np.testing.assert_array_equal(restored.rng, state.rng)
    # The restored state keeps training like the original.
    assert _leaves_equal(_step(restored, 3).params, _step(state, 3).params)


def test_keeps_the_last_k_and_the_best(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck", keep=2)
    state = _state()
    for k, top1 in enumerate([0.3, 0.9, None, 0.2, 0.4, None]):
        state = _step(state, k)
        checkpoints.save(state, {}, val_top1=top1)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 5, 6]  # 2 is the best (0.9); 5 and 6 are the last two
    assert checkpoints.best_step() == 2
    assert checkpoints.latest_step() == 6
    assert checkpoints.save(state, {}) is False  # step 6 is already there
    checkpoints.close()


def test_restore_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Checkpoints(tmp_path / "empty").restore(_state())
    with pytest.raises(ValueError, match="keep must be at least 1"):
        Checkpoints(tmp_path / "x", keep=0)
