"""The Flax NNX AlexNet: the linen model's parameters and numbers, bit for bit; loading, saving, training, the example.

Tolerances: logits, trunk features and round trips are compared exactly (assert_array_equal):
both models run the same functions on the same arrays with the same casts, so anything
but equality is a bug. One SGD step compares to 1e-6 relative: the two gradients come from
two separately compiled programs, which XLA may fuse differently.
"""

from __future__ import annotations

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alexnet_jax import (
    MEAN_RGB,
    STDDEV_RGB,
    AlexNet,
    ConversionError,
    flax_to_torch,
    load_variables,
    preprocess_batch,
    torch_to_flax,
    trunk_features,
)
from alexnet_jax.models.nnx import AlexNet as NNXAlexNet
from alexnet_jax.models.nnx import Conv, eval_step, logits, to_variables, train_step

from helpers import REPO, run_python

SCRIPT = REPO / "examples" / "finetune_nnx.py"
RNG_LEAVES = {f"{name}/rngs/{leaf}" for name in ("classifier_0", "classifier_3") for leaf in ("key", "count")}


def _flat(tree) -> dict[str, object]:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_state(model, *filters) -> dict[str, object]:
    return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, *filters))}


@pytest.fixture(scope="module")
def photos_224(photos) -> np.ndarray:
    return preprocess_batch(photos.values())  # (4, 224, 224, 3)


@pytest.fixture(scope="module")
def photos_256x320(photos) -> np.ndarray:
    # 256x320 leaves conv5's pooled map 7x9, so every window of the adaptive pool overlaps the next.
    images = np.stack([np.asarray(p.resize((320, 256)), np.float32) / 255 for p in photos.values()])
    return ((images - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)).astype(np.float32)


def _linen_logits(variables, x, **fields):
    return np.asarray(jax.jit(AlexNet(num_classes=_classes(variables), **fields).apply)(variables, x))


def _classes(variables) -> int:
    return variables["params"]["classifier_6"]["bias"].shape[0]


def _nnx_logits(model, x):
    return np.asarray(logits(model, x))


def test_state_mirrors_linen_params(flax_variables):
    # NNX's own init, traced abstractly: its names, shapes and dtypes without drawing 61M numbers.
    # (The example's smoke test runs it for real and loads the result as linen variables.)
    model = nnx.eval_shape(lambda: NNXAlexNet(rngs=nnx.Rngs(0)))
    linen = {k: (v.shape, v.dtype) for k, v in _flat(flax_variables()["params"]).items()}
    assert {k: (v.shape, v.dtype) for k, v in _flat_state(model, nnx.Param).items()} == linen
    # Besides the parameters only the two dropouts' rng streams, under torchvision's names.
    assert set(_flat_state(model)) == set(linen) | RNG_LEAVES
    assert model.classifier_0.deterministic and model.classifier_3.deterministic  # a new model starts in eval mode
    bf16 = nnx.eval_shape(lambda: NNXAlexNet(param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert {v.dtype for v in _flat_state(bf16, nnx.Param).values()} == {jnp.dtype(jnp.bfloat16)}


def test_conv_init_matches_linen(flax_variables):
    # Both LeCun-normal kernels and zero biases: conv1's 23,232 weights have the same spread to 5%.
    conv = Conv(3, 64, 11, stride=4, padding=2, rngs=nnx.Rngs(0))
    linen = flax_variables()["params"]["features_0"]
    assert conv.kernel.shape == linen["kernel"].shape and not np.any(np.asarray(conv.bias[...]))
    np.testing.assert_allclose(np.std(conv.kernel[...]), np.std(linen["kernel"]), rtol=0.05)


def test_from_variables_logits_equal_linen_on_photos(flax_variables, photos_224):
    variables = flax_variables()
    model = NNXAlexNet.from_variables(variables)
    assert model.num_classes == 1000 and model.classifier_0.deterministic
    np.testing.assert_array_equal(_nnx_logits(model, photos_224), _linen_logits(variables, photos_224))


def test_logits_equal_linen_non_square(flax_variables, photos_256x320):
    variables = flax_variables()
    model = NNXAlexNet.from_variables(variables)
    np.testing.assert_array_equal(_nnx_logits(model, photos_256x320), _linen_logits(variables, photos_256x320))


@pytest.mark.slow
def test_logits_equal_linen_bf16(flax_variables, photos_224):
    variables = flax_variables()
    model = NNXAlexNet.from_variables(variables, dtype=jnp.bfloat16)
    logits = _nnx_logits(model, photos_224[:2])
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_array_equal(logits, _linen_logits(variables, photos_224[:2], dtype=jnp.bfloat16))


@pytest.mark.slow
def test_logits_equal_linen_winograd(flax_variables, photos_256x320):
    variables = flax_variables()
    model = NNXAlexNet.from_variables(variables, conv_algorithm="winograd")
    x = photos_256x320[:1]
    # Eager: Winograd programs take seconds to compile, and jit is not what is compared here.
    np.testing.assert_array_equal(
        np.asarray(model(x)), np.asarray(AlexNet(conv_algorithm="winograd").apply(variables, x))
    )


def test_trunk_equals_trunk_features(flax_variables, photos_224):
    variables = flax_variables()
    model = NNXAlexNet.from_variables(variables)
    x = photos_224[:2]
    ours = model.trunk(x, ("relu5", "relu2"))
    assert list(ours) == ["relu5", "relu2"]
    expected = trunk_features(variables, x, ("relu5", "relu2"))
    for name in ours:
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(expected[name]), err_msg=name)
    # The stack runs only as deep as asked: relu1 of a 7x7 image, below the classifier's 63.
    assert model.trunk(np.zeros((1, 7, 7, 3), np.float32), ("relu1",))["relu1"].shape == (1, 1, 1, 64)
    with pytest.raises(ValueError, match="relu5 needs inputs of at least 31x31"):
        model.trunk(np.zeros((1, 30, 30, 3), np.float32))
    with pytest.raises(ValueError, match="unknown trunk layer 'fc7'"):
        model.trunk(x, ("fc7",))


@pytest.mark.slow
def test_to_variables_round_trips_bit_exactly(flax_variables):
    variables = flax_variables()
    back = to_variables(NNXAlexNet.from_variables(variables))
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for name, value in _flat(variables).items():
        assert _flat(back)[name].dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(_flat(back)[name]), value, err_msg=name)
    # A tree flax_to_torch takes (saving it is the example's smoke test).
    state_dict = flax_to_torch(back)
    assert len(state_dict) == 16 and state_dict["classifier.6.weight"].shape == (1000, 4096)


@pytest.mark.slow
@pytest.mark.torch
def test_ten_class_torchvision_tree(torchvision_state_dict, photos_224):
    variables = torch_to_flax(torchvision_state_dict(0, num_classes=10))
    model = NNXAlexNet.from_variables(variables)
    assert model.num_classes == 10 and model.classifier_6.kernel.shape == (4096, 10)
    logits = _nnx_logits(model, photos_224[:2])
    assert logits.shape == (2, 10)
    np.testing.assert_array_equal(logits, _linen_logits(variables, photos_224[:2]))


def test_bf16_parameters_keep_their_dtype(flax_variables):
    params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), flax_variables()["params"])
    model = NNXAlexNet.from_variables(params)  # a bare params tree works too
    assert model.param_dtype == jnp.bfloat16
    assert {v.dtype for v in _flat_state(model, nnx.Param).values()} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_dropout_on_in_train_mode_only(flax_variables):
    model = NNXAlexNet.from_variables(flax_variables(), rngs=nnx.Rngs(dropout=1))
    x = np.random.default_rng(0).normal(size=(2, 63, 63, 3)).astype(np.float32)
    forward = nnx.jit(lambda m, x: m(x))
    eval_logits = np.asarray(forward(model, x))
    np.testing.assert_array_equal(np.asarray(forward(model, x)), eval_logits)
    model.train()
    assert not model.classifier_0.deterministic and not model.classifier_3.deterministic
    first, second = np.asarray(forward(model, x)), np.asarray(forward(model, x))
    assert not np.array_equal(first, eval_logits)
    assert not np.array_equal(first, second)  # the stream's counter advanced through jit
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, x)), eval_logits)
    # The masks come from the rngs given: the same key, the same masks.
    again = NNXAlexNet.from_variables(flax_variables(), rngs=nnx.Rngs(dropout=1))
    again.train()
    np.testing.assert_array_equal(np.asarray(forward(again, x)), first)
    # A rate of 0 is no dropout, in either mode.
    no_dropout = NNXAlexNet.from_variables(flax_variables(), dropout_rate=0.0)
    no_dropout.train()
    np.testing.assert_array_equal(np.asarray(forward(no_dropout, x)), eval_logits)


@pytest.mark.torch
@pytest.mark.slow  # the fast loop keeps NNX's logits, init and state checks
def test_clear_errors(flax_variables, torchvision_state_dict):
    ten = torch_to_flax(torchvision_state_dict(0, num_classes=10))
    with pytest.raises(ValueError, match=r"10-class head \(classifier_6\) but num_classes=1000"):
        NNXAlexNet.from_variables(ten, num_classes=1000)
    model = NNXAlexNet.from_variables(flax_variables())
    x = np.zeros((1, 63, 63, 3), np.float32)
    with pytest.raises(ValueError, match=r"expects NHWC images of shape \(N, H, W, 3\), got \(1, 63, 63, 1\)"):
        model(np.zeros((1, 63, 63, 1), np.float32))
    with pytest.raises(ValueError, match="AlexNet needs inputs of at least 63x63, got 62x63"):
        model(np.zeros((1, 62, 63, 3), np.float32))
    # A head swapped in by hand, num_classes left behind: named, with the fix.
    model.classifier_6 = nnx.Linear(4096, 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"classifier_6 has 10 outputs but this model is AlexNet\(num_classes=1000\)"):
        model(x)
    model.replace_head(10, rngs=nnx.Rngs(0))
    assert model.num_classes == 10 and nnx.eval_shape(lambda m: m(x), model).shape == (1, 10)
    broken = {"params": {k: v for k, v in flax_variables()["params"].items() if k != "features_3"}}
    with pytest.raises(ConversionError, match="missing 2: features_3/kernel, features_3/bias"):
        NNXAlexNet.from_variables(broken)
    with pytest.raises(ValueError, match="unknown conv algorithm 'fast'"):
        NNXAlexNet.from_variables(flax_variables(), conv_algorithm="fast")


@pytest.mark.slow
def test_sgd_step_equals_linen(flax_variables):
    variables = flax_variables()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    y = np.array([3, 1, 4, 1], np.int32)
    tx = optax.sgd(0.01, momentum=0.9)

    model = NNXAlexNet.from_variables(variables, dropout_rate=0.0)
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx_losses = [float(train_step(model, optimizer, x, y)) for _ in range(2)]  # two: momentum counts on the second

    linen = AlexNet(dropout_rate=0.0)

    @jax.jit
    def linen_step(params, opt_state):
        def loss_fn(p):
            logits = linen.apply({"params": p}, x, train=True).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    opt_state = tx.init(params)
    linen_losses = []
    for _ in range(2):
        params, opt_state, loss = linen_step(params, opt_state)
        linen_losses.append(float(loss))

    np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-6)
    ours = _flat(to_variables(model)["params"])
    for name, value in _flat(params).items():
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(value), rtol=1e-6, atol=1e-9, err_msg=name)
    assert int(optimizer.step[...]) == 2
    # eval_step: per-example top-1 hits, in the model's mode.
    model.eval()
    hits = np.asarray(eval_step(model, x, y))
    np.testing.assert_array_equal(hits, np.argmax(_nnx_logits(model, x), -1) == y)


def _run_example(*args: str) -> subprocess.CompletedProcess:
    return run_python([SCRIPT, *args])


@pytest.mark.slow
def test_example_fine_tunes_and_saves_for_linen(tmp_path):
    output = tmp_path / "digits.msgpack"
    run = _run_example(
        "--random-init", "--steps", "2", "--batch-size", "8", "--image-size", "63", "--output", str(output)
    )
    assert run.returncode == 0, run.stderr
    assert "validation accuracy" in run.stdout and f"saved {output}" in run.stdout
    variables = load_variables(output)
    assert _classes(variables) == 10
    x = np.random.default_rng(0).normal(size=(2, 63, 63, 3)).astype(np.float32)
    np.testing.assert_array_equal(_linen_logits(variables, x), _nnx_logits(NNXAlexNet.from_variables(variables), x))


@pytest.mark.slow
def test_example_missing_weights_is_one_line(tmp_path):
    run = _run_example("--weights", str(tmp_path / "absent.msgpack"), "--steps", "1")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent.msgpack'}: no such file"]
