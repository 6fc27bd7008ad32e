"""The Flax module's architecture: shapes, the adaptive pool, dropout, parameter count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import IMAGENET1K_V1, AlexNet, check_variables
from alexnet_jax.models.alexnet import FEATURE_NAMES
from alexnet_jax.models.layers import adaptive_avg_pool, adaptive_pool_matrix

from helpers import slow_after


@pytest.fixture(scope="module")
def variables(flax_variables):
    return flax_variables()


def test_parameter_count_matches_torchvision_record(variables):
    assert sum(x.size for x in jax.tree.leaves(variables)) == IMAGENET1K_V1.num_params == 61_100_840


def test_layer_names_follow_torchvision_modules(variables):
    assert sorted(variables["params"]) == sorted(
        [
            "features_0",
            "features_3",
            "features_6",
            "features_8",
            "features_10",
            "classifier_1",
            "classifier_4",
            "classifier_6",
        ]
    )
    assert check_variables(variables) == 1000


@pytest.mark.parametrize(
    "size, conv1, relu5",
    slow_after(
        1,
        [
            ((224, 224), (55, 55), (13, 13)),
            ((227, 227), (56, 56), (13, 13)),
            ((256, 320), (63, 79), (15, 19)),
            ((63, 63), (15, 15), (3, 3)),
        ],
        unpack=True,
    ),
)
def test_activation_shapes(variables, size, conv1, relu5):
    # conv1 at 224 is 55x55 only with torchvision's explicit padding 2; 'SAME' would give 56x56.
    x = jnp.zeros((2, *size, 3))
    logits, state = AlexNet().apply(variables, x, mutable=["intermediates"])
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    assert sorted(inter) == sorted(FEATURE_NAMES)
    assert inter["relu1"].shape == (2, *conv1, 64)
    assert inter["relu5"].shape == (2, *relu5, 256)
    assert inter["fc7"].shape == (2, 4096)
    assert logits.shape == (2, 1000)


def test_smaller_than_min_size_is_a_clear_error(variables):
    with pytest.raises(ValueError, match="at least 63x63"):
        AlexNet().apply(variables, jnp.zeros((1, 62, 100, 3)))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        AlexNet().apply(variables, jnp.zeros((1, 3, 224, 224)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 9, 12, 13, 15, 19, 25])
@pytest.mark.torch
def test_adaptive_pool_matches_torch(n):
    import torch

    x = np.random.default_rng(n).standard_normal((2, n, n + 4, 3)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), (6, 6)).numpy()
    got = np.asarray(adaptive_avg_pool(jnp.asarray(x))).transpose(0, 3, 1, 2)
    # Separable matmul vs torch's direct window sum: float32 rounding only.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.torch
def test_adaptive_pool_windows_overlap_like_torch():
    # n=7: windows [0,2) [1,3) [2,4) [3,5) [4,6) [5,7), each of length 2, overlapping.
    m = adaptive_pool_matrix(7)
    assert [tuple(np.flatnonzero(row)) for row in m] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    np.testing.assert_allclose(m.sum(1), 1.0)


@pytest.mark.slow
def test_dropout_only_in_training(variables):
    x = jax.random.normal(jax.random.key(1), (2, 224, 224, 3))
    model = AlexNet()
    eval_a = model.apply(variables, x)
    eval_b = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)
    no_dropout = AlexNet(dropout_rate=0.0).apply(variables, x, train=True)
    np.testing.assert_allclose(no_dropout, eval_a, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_num_classes_and_dtypes(flax_variables):
    model = AlexNet(num_classes=10, dtype=jnp.bfloat16)
    variables = flax_variables(0, 10)
    assert variables["params"]["classifier_6"]["kernel"].shape == (4096, 10)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert model.apply(variables, jnp.zeros((3, 100, 80, 3))).dtype == jnp.bfloat16
    assert check_variables(variables) == 10


@pytest.mark.parametrize("shape", slow_after(1, [(2, 55, 55, 8), (3, 7, 9, 4), (1, 27, 28, 5)]))
@pytest.mark.torch
def test_max_pool_gradient_matches_torch_ties_included(shape):
    """The hand-written max-pool gradient routes to the first maximum of each window, as torch does."""
    import torch

    from alexnet_jax.models.layers import max_pool

    rng = np.random.default_rng(sum(shape))
    # Rounded, ReLU'd values: many windows hold several equal maxima (zeros and positive ties).
    x = np.maximum(np.round(rng.standard_normal(shape) * 2) / 2, 0).astype(np.float32)
    y, vjp = jax.vjp(max_pool, jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    # Overlapping windows add in another order than torch: float32 rounding of a few terms.
    np.testing.assert_allclose(
        np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=2e-6
    )


@pytest.mark.slow
def test_max_pool_forward_mode_is_the_transpose_of_its_gradient():
    # jvp and grad both work through the pool (the derivative is a custom_jvp), and agree.
    from alexnet_jax.models.layers import max_pool

    rng = np.random.default_rng(0)
    x, t = (jnp.asarray(rng.standard_normal((2, 13, 15, 3)).astype(np.float32)) for _ in range(2))
    y, jvp_out = jax.jvp(max_pool, (x,), (t,))
    g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    (vjp_out,) = jax.vjp(max_pool, x)[1](g)
    np.testing.assert_allclose(float(jnp.vdot(jvp_out, g)), float(jnp.vdot(t, vjp_out)), rtol=1e-5)


def test_default_is_xla_convolution():
    assert AlexNet().conv_algorithm == "xla"


def test_fields_are_documented_where_help_shows_them():
    doc = AlexNet.__doc__
    for field in ("num_classes", "dropout_rate", "dtype", "param_dtype", "conv_algorithm"):
        assert f"{field}:" in doc, field


@pytest.mark.slow
def test_head_of_another_size_is_a_clear_error(flax_variables):
    with pytest.raises(ValueError, match=r"10-class head .* AlexNet\(num_classes=1000\)"):
        AlexNet().apply(flax_variables(0, 10), jnp.zeros((1, 63, 63, 3)))


@pytest.mark.slow  # the tiny fine-tuning and test_archs replace heads in the fast loop
def test_replace_head_keeps_the_body_and_fits_the_new_size(variables):
    from alexnet_jax import replace_head

    new = replace_head(variables, 7, seed=1)
    assert new["params"]["classifier_6"]["kernel"].shape == (4096, 7)
    assert not np.any(np.asarray(new["params"]["classifier_6"]["bias"]))
    for name in ("features_0", "classifier_4"):
        assert new["params"][name] is variables["params"][name]
    assert AlexNet(num_classes=7).apply(new, jnp.zeros((1, 63, 63, 3))).shape == (1, 7)
    with pytest.raises(ValueError, match="at least 1"):
        replace_head(variables, 0)


@pytest.mark.slow  # test_lpips and test_nnx run the trunk in the fast loop
@pytest.mark.parametrize("size", [224, 64])
def test_trunk_features_equal_the_sown_activations(variables, size):
    from alexnet_jax import trunk_features

    x = jax.random.normal(jax.random.key(4), (2, size, size + 8, 3))
    _, state = AlexNet().apply(variables, x, mutable=["intermediates"])
    got = jax.jit(trunk_features)(variables, x)
    assert list(got) == ["relu1", "relu2", "relu3", "relu4", "relu5"]
    for name, value in got.items():
        np.testing.assert_array_equal(value, state["intermediates"][name][0])


@pytest.mark.slow
def test_trunk_features_choice_of_layers_depth_and_grad(variables):
    from alexnet_jax import trunk_features
    from alexnet_jax.models.alexnet import trunk_min_size

    conv_only = {"params": {k: v for k, v in variables["params"].items() if k.startswith("features_")}}
    x = jax.random.normal(jax.random.key(5), (1, 31, 40, 3))
    got = trunk_features(conv_only, x, ("relu5", "relu2"))  # below the classifier's 63, with no classifier
    assert list(got) == ["relu5", "relu2"] and got["relu5"].shape == (1, 1, 1, 256)
    # Stops at the deepest layer asked for: relu2 needs only 15 pixels.
    assert trunk_features(conv_only, x[:, :15, :15], ["relu1", "relu2"])["relu2"].shape == (1, 1, 1, 192)
    assert [trunk_min_size(n) for n in range(1, 6)] == [7, 15, 31, 31, 31]
    with pytest.raises(ValueError, match="relu5 needs inputs of at least 31x31"):
        trunk_features(conv_only, x[:, :30])
    with pytest.raises(ValueError, match="unknown trunk layer 'fc7'"):
        trunk_features(conv_only, x, ["fc7"])
    # A pure function of the input: differentiable, as a perceptual loss needs.
    g = jax.grad(lambda x: trunk_features(conv_only, x, ["relu3"])["relu3"].sum())(x)
    assert g.shape == x.shape and float(jnp.abs(g).sum()) > 0
