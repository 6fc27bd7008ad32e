"""The paper's two-GPU layout (`towers.py`) against the single-device AlexNet2012, on forced CPU devices.

One child process (this file as a script, XLA_FLAGS forcing 4 host devices) runs: the
forward on 2 devices (one tower each; on auto and on explicit mesh axes), a training step with dropout on over 4 devices
(2 data-parallel pairs of towers), both against the single-device model from the same
parameters and keys, and counts the collectives in the compiled forward. Tolerance 1e-5
of each tensor's largest value: the towers sum the same products in another order (fc8's
halves, gradients over the data shards), nothing else differs.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, json_from_script_on_devices, relative_difference

DEVICES = 4
BATCH = 4  # 2 images per data-parallel pair of towers
NUM_CLASSES = 7
TOLERANCE = 1e-5


def _collectives(hlo: str) -> dict[str, int]:
    import re

    ops = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
    # Count instructions (" = type op(" or "op-start("), not the names that mention them.
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in ops}


def _child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax import AlexNet2012
    from alexnet_jax.distributed.towers import make_tower_mesh, make_towers, shard_params, tower_apply
    from alexnet_jax.steps import create_train_state, make_optimizer, train_step

    assert jax.device_count() == DEVICES, jax.devices()
    model = AlexNet2012(num_classes=NUM_CLASSES)
    params = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))["params"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 227, 227, 3)).astype(np.float32)
    out = {}

    # Forward, two devices: one tower each, no data parallelism.
    mesh = make_tower_mesh(jax.devices()[:2])
    apply = jax.jit(tower_apply(model, mesh))
    sharded = {"params": shard_params(mesh, params)}
    want = np.asarray(jax.jit(model.apply)({"params": params}, x[:2]))
    compiled = apply.lower(sharded, x[:2]).compile()
    out["logits"] = relative_difference(np.asarray(compiled(sharded, x[:2])), want)
    out["collectives"] = _collectives(compiled.as_text())
    # The same on a `jax.make_mesh` mesh (explicit axes, JAX's default), where shard_map refuses unplaced inputs.
    explicit = jax.make_mesh((1, 2), ("data", "model"), devices=jax.devices()[:2])
    with jax.set_mesh(explicit):
        on_explicit = jax.jit(tower_apply(model, explicit))({"params": shard_params(explicit, params)}, x[:2])
    out["explicit_axes"] = str(explicit.axis_types)
    out["explicit_logits"] = relative_difference(np.asarray(on_explicit), want)
    kernel = sharded["params"]["features_4"]["kernel"]
    out["conv2_shards"] = sorted({tuple(s.data.shape) for s in kernel.addressable_shards})

    # One SGD step with dropout on, four devices: 2 pairs of towers x 2 data shards.
    batch = {
        "image": x,
        "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
        "mask": np.array([1, 1, 1, 0], np.float32),  # padding in the last shard only
    }
    tx = make_optimizer(0.01, weight_decay=5e-4)

    def fresh():
        return create_train_state(model, jax.tree.map(np.copy, params), tx, seed=0)

    single, single_metrics = train_step(fresh(), batch)
    towers = make_towers(model, global_batch=BATCH)
    out["mesh"] = dict(towers.mesh.shape)
    state, metrics = towers.step(towers.put_state(fresh()), towers.put_batch(batch))
    out["step_params"] = relative_difference(jax.device_get(state.params), jax.device_get(single.params))
    out["step_momentum"] = relative_difference(jax.device_get(state.opt_state), jax.device_get(single.opt_state))
    out["step_loss"] = abs(float(metrics["loss"]) - float(single_metrics["loss"])) / abs(float(single_metrics["loss"]))
    out["moved"] = relative_difference(params, jax.device_get(single.params))
    out["fc6_spec"] = str(state.params["classifier_1"]["kernel"].sharding.spec)
    return out


@pytest.fixture(scope="module")
def result():
    return json_from_script_on_devices(__file__, DEVICES)


@pytest.mark.slow
def test_two_towers_give_the_single_device_logits(result):
    assert result["logits"] < TOLERANCE, result
    assert "Explicit" in result["explicit_axes"]
    assert result["explicit_logits"] < TOLERANCE, result


@pytest.mark.slow
def test_each_device_holds_its_towers_half(result):
    # conv2 is (5, 5, 48, 256) with 2 groups: each device holds its group's 128 kernels.
    assert result["conv2_shards"] == [[5, 5, 48, 128]]


@pytest.mark.slow
def test_towers_communicate_only_where_the_paper_did(result):
    # all-gathers before conv3, fc6 and fc7; fc8's halves summed; LRN's 2-channel halo both ways after conv1 and conv2.
    assert result["collectives"] == {
        "all-gather": 3,
        "all-reduce": 1,
        "collective-permute": 4,
        "all-to-all": 0,
        "reduce-scatter": 0,
    }


@pytest.mark.slow
def test_a_training_step_with_data_parallel_towers_equals_the_single_device_step(result):
    assert result["mesh"] == {"data": 2, "model": 2}
    assert result["moved"] > 1e-4  # the step changed the parameters: the comparison is not vacuous
    assert result["step_params"] < TOLERANCE, result
    assert result["step_momentum"] < TOLERANCE, result
    assert result["step_loss"] < TOLERANCE, result
    assert result["fc6_spec"] in ("PartitionSpec(None, 'model')", "P(None, 'model')")


def test_clear_errors():
    import jax

    from alexnet_jax import AlexNet
    from alexnet_jax.distributed.towers import make_tower_mesh, tower_apply

    with pytest.raises(ValueError, match="needs an even number of devices .* got 1"):
        make_tower_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="the two-tower layout is AlexNet2012's; got AlexNet"):
        tower_apply(AlexNet(), None)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_child()))
