"""pmap, sharded jit and gradient accumulation against single-device steps, on 4 CPU devices.

The rest of the suite runs on one device, so the 4-device work happens in one child
process (this file run as a script with XLA_FLAGS forcing 4 host devices) that trains
every variant on the same global batches and prints JSON; the tests read it. The
variants train the tests' tiny network (`tiny_arch`): what is under test is how a step
is spread over devices; AlexNet itself runs under explicit mesh axes.
Tolerance 1e-5 of each tensor's largest value: the variants sum the same gradients
in a different order (per device, then across devices), nothing else differs.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from helpers import REPO, json_from_script_on_devices, relative_difference

# Every test reads the one 4-device child, which trains in five layouts and runs AlexNet on a mesh.
pytestmark = pytest.mark.slow

DEVICES = 4
STEPS = 2  # the second step reads the momentum of the first
BATCH = 8  # global: 2 images per device, 1 per device and micro-batch with 2 micro-batches
SIZE = 64
NUM_CLASSES = 7
TOLERANCE = 1e-5


def _batches(n: int = STEPS):
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for step in range(n):
        mask = np.ones(BATCH, np.float32)
        if step == 1:
            mask[5:] = 0  # padding in the last shards only: a mean of per-device means would be wrong
        out.append(
            {
                "image": rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32),
                "label": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
                "mask": mask,
            }
        )
    return out


def _child() -> dict:
    """Runs with 4 devices: every variant from the same start on the same batches."""
    import jax
    import numpy as np

    from alexnet_jax.distributed.parallel import PMAP_AXIS, make_parallel
    from alexnet_jax.steps import create_train_state, dropout_key, init_params, make_optimizer

    from tiny_arch import TinyAlexNet

    assert jax.device_count() == DEVICES, jax.devices()
    # Dropout off: the variants draw different masks. XLA's convolution: what is under test is
    # the step's distribution, and it compiles in a fraction of the Winograd layers' time.
    model = TinyAlexNet(num_classes=NUM_CLASSES, dropout_rate=0.0, conv_algorithm="xla")
    start = jax.device_get(init_params(model, seed=0, image_size=SIZE))
    batches = _batches()

    def run(mode: str, micro_steps: int = 1):
        started = time.perf_counter()
        parallel = make_parallel(mode, global_batch=BATCH, micro_steps=micro_steps)
        state = create_train_state(model, jax.tree.map(np.copy, start), make_optimizer(0.05, weight_decay=1e-4), seed=0)
        state = parallel.put_state(state)
        losses = []
        for batch in batches:
            state, metrics = parallel.step(state, parallel.put_batch(batch))
            losses.append(float(metrics["loss"]))
        print(f"{mode} x{micro_steps}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return jax.device_get(state.params), losses, str(jax.tree.leaves(state.params)[0].sharding)

    reference, ref_losses, _ = run("none")
    out = {"moved": relative_difference(start, reference), "variants": {}}
    # pmap with micro-batches runs the same split as the two others; left out to keep the test short.
    for name, mode, micro in (
        ("pmap", "pmap", 1),
        ("sharded", "sharded", 1),
        ("accumulate", "none", 2),
        ("sharded_accumulate", "sharded", 2),
    ):
        params, losses, sharding = run(mode, micro)
        out["variants"][name] = {
            "params": relative_difference(params, reference),
            "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "sharding": sharding,
        }
    out["explicit_mesh"] = _explicit_mesh(batches[0]["image"])
    # pmap needs one mapped argument; the device index comes from the axis, not from it.
    keys = jax.pmap(lambda rng, _: dropout_key(rng, 3, PMAP_AXIS), axis_name=PMAP_AXIS, in_axes=(None, 0))(
        jax.random.PRNGKey(0), np.arange(DEVICES)
    )
    out["distinct_device_keys"] = len({tuple(k) for k in np.asarray(keys).tolist()})
    return out


def _explicit_mesh(x) -> dict:
    """AlexNet with the batch sharded over a `jax.make_mesh` mesh (explicit axes, JAX 0.10's default)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from alexnet_jax import AlexNet
    from alexnet_jax.steps import init_params

    mesh = jax.make_mesh((DEVICES,), ("data",))
    variables = {"params": jax.device_get(init_params(AlexNet(num_classes=NUM_CLASSES), seed=0, image_size=SIZE))}
    out = {"axis_types": str(mesh.axis_types)}
    # The default path forward and backward; Winograd forward only (its reshapes are what explicit
    # axes once refused, and each of its gradients costs ~10 s to compile).
    for algorithm, with_grads in (("xla", True), ("winograd", False)):
        model = AlexNet(num_classes=NUM_CLASSES, conv_algorithm=algorithm)
        grad = jax.grad(lambda v, x, model=model: jax.nn.log_softmax(model.apply(v, x))[:, 0].sum())
        logits = jax.jit(model.apply)(variables, x)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            vs = jax.device_put(variables, NamedSharding(mesh, P()))
            sharded = jax.jit(model.apply)(vs, xs)
            sharded_grads = jax.jit(grad)(vs, xs) if with_grads else None
        out[algorithm] = {
            "logits": relative_difference(jax.device_get(sharded), jax.device_get(logits)),
            "spec": list(sharded.sharding.spec),
        }
        if with_grads:
            grads = jax.jit(grad)(variables, x)
            out[algorithm]["grads"] = relative_difference(jax.device_get(sharded_grads), jax.device_get(grads))
    return out


@pytest.fixture(scope="module")
def result():
    return json_from_script_on_devices(__file__, DEVICES)


def test_the_comparison_is_not_vacuous(result):
    assert result["moved"] > 1e-3


# pmap and shardings against single-device steps; accumulated micro-batches against the big batch.
@pytest.mark.parametrize("variant", ["pmap", "sharded", "accumulate", "sharded_accumulate"])
def test_parallel_and_accumulated_steps_equal_single_device_steps(result, variant):
    got = result["variants"][variant]
    assert got["params"] < TOLERANCE, got
    assert got["loss"] < TOLERANCE, got


def test_the_sharded_state_is_replicated_over_the_four_devices(result):
    assert (
        "P()" in result["variants"]["sharded"]["sharding"]
        or "PartitionSpec()" in result["variants"]["sharded"]["sharding"]
    )


@pytest.mark.parametrize("algorithm", ["xla", "winograd"])
def test_the_model_runs_under_explicit_mesh_axes(result, algorithm):
    got = result["explicit_mesh"]
    assert "Explicit" in got["axis_types"]
    assert got[algorithm]["spec"] == ["data", None]  # the logits stay split as the batch was
    assert got[algorithm]["logits"] < TOLERANCE, got
    assert got[algorithm].get("grads", 0.0) < TOLERANCE, got  # gradients: the default path only
    assert ("grads" in got[algorithm]) == (algorithm == "xla")


def test_each_device_gets_its_own_dropout_key(result):
    assert result["distinct_device_keys"] == DEVICES


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(_child()))
