"""Winograd convolutions: exact transforms, the same function as XLA's convolution, and the model's choice."""

from __future__ import annotations

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax import AlexNet
from alexnet_jax.models import winograd
from alexnet_jax.models.layers import Conv
from alexnet_jax.transforms.preprocess import preprocess_batch

from helpers import slow_after


@pytest.mark.parametrize("m, r", [(2, 3), (2, 5), (3, 3), (4, 3), (3, 5)])
def test_transforms_compute_the_correlation_exactly(m, r):
    # A^T [(G g) * (B^T d)] must equal y_i = sum_k d_{i+k} g_k for every d and g. Both sides
    # are bilinear, so holding exactly on every pair of basis vectors is a proof.
    at, g, bt = winograd.transforms(m, r)
    unit = lambda n, i: [Fraction(int(j == i)) for j in range(n)]  # noqa: E731
    for d, k in ((unit(m + r - 1, i), unit(r, j)) for i in range(m + r - 1) for j in range(r)):
        gk = [sum(gj * kj for gj, kj in zip(row, k)) for row in g]
        bd = [sum(bj * dj for bj, dj in zip(row, d)) for row in bt]
        y = [sum(a * u * v for a, u, v in zip(row, gk, bd)) for row in at]
        assert y == [sum(d[i + j] * k[j] for j in range(r)) for i in range(m)]
    # The input transform is applied to every activation: integer weights keep it cheap.
    assert all(v.denominator == 1 for row in bt for v in row)


def test_too_many_points_is_a_clear_error():
    with pytest.raises(ValueError, match="interpolation points"):
        winograd.transforms(8, 5)


def _xla_conv(x, kernel, padding):
    return lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


# (height, width, channels in, channels out, kernel, padding, tile): AlexNet's layers,
# odd and even sizes, non-square inputs, no padding, and an input smaller than a tile.
CASES = [
    (13, 13, 5, 4, 3, 1, 2),
    (27, 27, 3, 6, 5, 2, 2),
    (8, 11, 4, 3, 3, 1, 2),
    (9, 6, 2, 5, 5, 2, 3),
    (7, 10, 3, 2, 3, 0, 4),
    (1, 2, 2, 3, 3, 1, 2),
]


@pytest.mark.parametrize("h, w, cin, cout, r, padding, tile", slow_after(1, CASES, unpack=True))
def test_conv_is_xla_conv_in_float64(h, w, cin, cout, r, padding, tile):
    rng = np.random.default_rng(h * w + r)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, h, w, cin)))
        k = jnp.asarray(rng.standard_normal((r, r, cin, cout)))
        got = winograd.conv(x, k, padding, tile)
        want = _xla_conv(x, k, padding)
        assert got.dtype == jnp.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * float(jnp.abs(want).max()))


@pytest.mark.slow  # the fast loop trains through Winograd (test_train_loop, conv_algorithm "auto")
@pytest.mark.parametrize("h, w, cin, cout, r, padding, tile", CASES[:4])
def test_conv_derivatives_are_xla_conv_derivatives(h, w, cin, cout, r, padding, tile):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, h, w, cin)))
        k = jnp.asarray(rng.standard_normal((r, r, cin, cout)))
        loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding)))  # noqa: E731
        for got, want in zip(
            jax.grad(loss(lambda *a: winograd.conv(*a, tile)), argnums=(0, 1))(x, k),
            jax.grad(loss(_xla_conv), argnums=(0, 1))(x, k),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # Forward mode too (jvp, as jax.jacfwd uses).
        tx, tk = jnp.ones_like(x), jnp.ones_like(k)
        _, got = jax.jvp(lambda x, k: winograd.conv(x, k, padding, tile), (x, k), (tx, tk))
        _, want = jax.jvp(lambda x, k: _xla_conv(x, k, padding), (x, k), (tx, tk))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "h, cin, cout, r, dtype, bound",
    [
        (13, 384, 256, 3, jnp.float32, 4),  # conv4: about twice the direct error
        (27, 64, 192, 5, jnp.float32, 20),  # conv2: 5x5 transforms cancel more, about ten times
        (27, 64, 192, 5, jnp.bfloat16, 2),  # computed in float32 inside: as good as XLA's bf16 conv
    ],
)
@pytest.mark.slow
def test_conv_error_against_float64_truth_is_bounded(h, cin, cout, r, dtype, bound):
    # AlexNet's layer shapes at batch 2, ReLU-like inputs, lecun-scaled kernels.
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((2, h, h, cin)), 0)
    k = rng.standard_normal((r, r, cin, cout)) / np.sqrt(r * r * cin)
    with jax.enable_x64(True):
        truth = np.asarray(_xla_conv(jnp.asarray(x), jnp.asarray(k), r // 2))
    xd, kd = jnp.asarray(x, dtype), jnp.asarray(k, dtype)
    got = winograd.conv(xd, kd, r // 2)
    assert got.dtype == dtype
    err_winograd = np.abs(np.asarray(got, np.float64) - truth).max()
    err_xla = np.abs(np.asarray(_xla_conv(xd, kd, r // 2), np.float64) - truth).max()
    assert err_winograd < bound * err_xla


def test_conv_rejects_an_input_smaller_than_the_kernel():
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        winograd.conv(jnp.zeros((1, 1, 4, 2)), jnp.zeros((3, 3, 2, 2)), 0)


def test_conv_rejects_a_kernel_that_does_not_fit():
    with pytest.raises(ValueError, match="square kernel with 3 input channels"):
        winograd.conv(jnp.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 4, 2)), 1)


def test_conv_module_has_nn_conv_parameters():
    # Same names, shapes, initializers and values as nn.Conv: checkpoints and the
    # conversion table must not depend on the algorithm.
    x = jnp.zeros((1, 9, 9, 5))
    ours = Conv(7, 3, padding=1).init(jax.random.key(3), x)
    theirs = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.key(3), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


def test_auto_picks_winograd_for_float32_on_cpu_only():
    assert winograd.use_winograd(jnp.float32) == (jax.default_backend() == "cpu")
    assert not winograd.use_winograd(jnp.bfloat16)
    assert not winograd.use_winograd(jnp.float16)


def _count(jaxpr, name):
    """Occurrences of primitive `name` in a jaxpr, nested ones (pjit, custom_jvp) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                n += _count(inner, name)
    return n


ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.parametrize(
    "algorithm, dtype, xla_convs",
    [
        ("xla", jnp.float32, 5),
        ("winograd", jnp.float32, 1),
        ("winograd", jnp.bfloat16, 1),
        ("auto", jnp.float32, 1 if ON_CPU else 5),
        ("auto", jnp.bfloat16, 5),
    ],
)
def test_algorithm_choice_reaches_the_graph(flax_variables, algorithm, dtype, xla_convs):
    # conv1 (stride 4) always stays XLA's convolution; Winograd takes the four stride-1 layers.
    variables = flax_variables()
    jaxpr = jax.make_jaxpr(AlexNet(conv_algorithm=algorithm, dtype=dtype).apply)(variables, jnp.zeros((1, 63, 63, 3)))
    assert _count(jaxpr.jaxpr, "conv_general_dilated") == xla_convs


@pytest.mark.slow
def test_algorithms_agree_on_logits(flax_variables, photos):
    variables = flax_variables()
    x = jnp.asarray(preprocess_batch(photos.values()))
    fast = AlexNet(conv_algorithm="winograd").apply(variables, x)
    plain = AlexNet(conv_algorithm="xla").apply(variables, x)
    scale = float(jnp.abs(plain).max())
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-4 * scale)


def test_unknown_algorithm_is_a_clear_error(flax_variables):
    with pytest.raises(ValueError, match="unknown conv algorithm 'fft'; expected one of xla, winograd, auto"):
        AlexNet(conv_algorithm="fft").apply(flax_variables(), jnp.zeros((1, 63, 63, 3)))
