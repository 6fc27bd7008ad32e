"""Inputs that would give wrong answers without a word are refused in one line, or taken the right way.

Integer images to every network and to LPIPS, one image array given where a batch is
expected, LPIPS images outside their range, and bare params where `{"params": ...}` is
expected. Refusals happen while tracing, so most checks here run on shapes alone
(`jax.eval_shape`) and cost no compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alexnet_jax import AlexNet, AlexNet2012, features, lpips, predict, predict_logits, trunk_features
from alexnet_jax.models import nnx as nnx_models
from alexnet_jax.models.layers import check_sides

INT_DTYPES = (jnp.uint8, jnp.int32)


def _abstract_variables(model, size: int):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("model,size", [(AlexNet(), 224), (AlexNet2012(), 227)], ids=["AlexNet", "AlexNet2012"])
def test_linen_models_refuse_integer_images(model, size, dtype):
    variables = _abstract_variables(model, size)
    name = type(model).__name__
    with pytest.raises(TypeError, match=rf"^{name} takes float images, got {jnp.dtype(dtype).name}; pass .*preprocess"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, size, size, 3), dtype))


@pytest.mark.parametrize("cls,size", [(nnx_models.AlexNet, 224), (nnx_models.AlexNet2012, 227)])
def test_nnx_models_refuse_integer_images(cls, size):
    model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
    x = np.zeros((1, size, size, 3), np.uint8)
    with pytest.raises(TypeError, match="takes float images, got uint8; pass alexnet_jax.preprocess"):
        model(x)
    if cls is nnx_models.AlexNet:
        with pytest.raises(TypeError, match="relu5 takes float images, got uint8"):
            model.trunk(x)


def test_trunk_features_refuses_integer_images():
    variables = _abstract_variables(AlexNet(), 63)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
    with pytest.raises(TypeError, match="relu5 takes float images, got uint8; pass alexnet_jax.preprocess"):
        jax.eval_shape(trunk_features, variables, x)


def test_lpips_refuses_integer_images_and_values_out_of_range(trunk_variables):
    p = lpips.load(trunk_variables)
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3))
    with pytest.raises(TypeError, match=r"^LPIPS takes float images, got (u?int\d+); pass x / 127.5 - 1"):
        lpips.distance(p, pixels.astype(np.uint8), pixels.astype(np.uint8))
    with pytest.raises(ValueError, match=r"takes images in \[-1, 1\], got values in \[0, 25\d\]; pass x / 127.5 - 1"):
        lpips.distance(p, pixels.astype(np.float32), pixels.astype(np.float32))
    unit = (pixels / 255).astype(np.float32)
    with pytest.raises(ValueError, match=r"with normalize=True takes images in \[0, 1\], got values in \[-1, 1\]"):
        lpips.distance(p, 2 * unit - 1, 2 * unit - 1, normalize=True)
    with pytest.raises(ValueError, match=r"got values in \[nan, nan\]|got values in \[-1, nan\]"):
        lpips.distance(p, np.full_like(unit, np.nan), unit)
    # In range, by either convention, and a slight overshoot from resampling: accepted.
    lpips.check_range(unit * 1.02, normalize=True)
    lpips.check_range((2 * unit - 1) * 1.04)
    lpips.check_range(jnp.asarray(2 * unit - 1))
    # Traced values are not checked (they are unknown until the program runs): tracing succeeds.
    traced = jax.eval_shape(lambda a: lpips.distance(p, a, a), pixels.astype(np.float32))
    assert traced.shape == (1,)


def test_predict_and_features_refuse_one_image_array():
    variables = _abstract_variables(AlexNet(), 63)  # refused before any compute: shapes are enough
    image = np.zeros((256, 385, 3), np.uint8)
    for fn in (predict, predict_logits, features):
        for one in (image, image[..., 0], np.zeros((256, 385, 4), np.uint8), jnp.asarray(image)):
            with pytest.raises(
                TypeError, match=r"got one image array of shape \(256, 385(, [34])?\); wrap it in a list"
            ):
                fn(variables, one)


def test_bare_params_work_wherever_variables_do(trunk_variables):
    bare = trunk_variables["params"]
    x = np.random.default_rng(0).standard_normal((2, 35, 35, 3)).astype(np.float32)
    model = AlexNet()
    wrapped = model.apply(trunk_variables, x, ("relu2",), method=AlexNet.trunk)["relu2"]
    np.testing.assert_array_equal(model.apply(bare, x, ("relu2",), method=AlexNet.trunk)["relu2"], wrapped)
    np.testing.assert_array_equal(trunk_features(bare, x, ("relu2",))["relu2"], wrapped)
    np.testing.assert_array_equal(trunk_features(trunk_variables, x, ("relu2",))["relu2"], wrapped)
    jax.tree.map(np.testing.assert_array_equal, lpips.load(bare), lpips.load(trunk_variables))
    # The whole network, traced: bare params and other collections (sow() appends to those given) go through.
    variables = _abstract_variables(model, 63)
    images = jax.ShapeDtypeStruct((2, 63, 63, 3), jnp.float32)
    assert jax.eval_shape(model.apply, variables["params"], images).shape == (2, 1000)
    assert jax.eval_shape(
        AlexNet2012().apply,
        _abstract_variables(AlexNet2012(), 227)["params"],
        jax.ShapeDtypeStruct((1, 227, 227, 3), jnp.float32),
    ).shape == (1, 1000)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, images)
    assert set(state["intermediates"]) == {"relu1", "relu2", "relu3", "relu4", "relu5", "fc7"}


def test_size_checks_on_symbolic_shapes_ask_for_constraints():
    (b, h, w) = jax.export.symbolic_shape("b, h, w")
    with pytest.raises(ValueError, match=r'at least 63x63; the symbolic sides h x w|constraints=\("h >= 63"'):
        check_sides(jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), 63, "AlexNet")
    (b, h, w) = jax.export.symbolic_shape("b, h, w", constraints=("h >= 63", "w >= 63"))
    check_sides(jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), 63, "AlexNet")  # decided: no error
    with pytest.raises(ValueError, match="AlexNet needs inputs of at least 64x64"):
        check_sides(jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), 64, "AlexNet")
