"""The conversion table: layouts, strictness, round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alexnet_jax import ConversionError, flax_to_torch, torch_to_flax

from helpers import slow_after

# The module imports torch (or lpips): every test in it needs them.
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def state_dict():
    """torchvision-format weights with distinct values everywhere (no symmetric matrices)."""
    from alexnet_jax.weights.reference import _vendored_alexnet_class

    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in _vendored_alexnet_class()().state_dict().items()}


def test_conv_is_oihw_to_hwio(state_dict):
    params = torch_to_flax(state_dict)["params"]
    w = state_dict["features.3.weight"].numpy()  # (192, 64, 5, 5)
    k = params["features_3"]["kernel"]  # (5, 5, 64, 192)
    assert k.shape == (5, 5, 64, 192)
    assert k[1, 2, 7, 100] == w[100, 7, 1, 2]


@pytest.mark.slow
def test_square_linear_is_transposed(state_dict):
    # classifier.4 is 4096x4096: a missing transpose would pass every shape check.
    w = state_dict["classifier.4.weight"].numpy()
    k = torch_to_flax(state_dict)["params"]["classifier_4"]["kernel"]
    assert not np.array_equal(w, w.T)
    np.testing.assert_array_equal(k, w.T)


@pytest.mark.slow
def test_classifier1_permuted_from_chw_to_hwc(state_dict):
    w = state_dict["classifier.1.weight"].numpy()  # (4096, 256*6*6), input index c*36 + h*6 + w
    k = torch_to_flax(state_dict)["params"]["classifier_1"]["kernel"]  # (6*6*256, 4096), index h*1536 + w*256 + c
    for h, x, c, out in [(0, 0, 0, 0), (2, 5, 17, 9), (5, 1, 255, 4095), (3, 3, 128, 2048)]:
        assert k[h * 1536 + x * 256 + c, out] == w[out, c * 36 + h * 6 + x]


@pytest.mark.slow
def test_flatten_permutation_equals_nchw_flatten(state_dict):
    """Flax's NHWC flatten with the permuted weight == torch's NCHW flatten with the original."""
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((2, 6, 6, 256)).astype(np.float32)
    w = state_dict["classifier.1.weight"].numpy()
    torch_out = pooled.transpose(0, 3, 1, 2).reshape(2, -1) @ w.T
    flax_out = pooled.reshape(2, -1) @ torch_to_flax(state_dict)["params"]["classifier_1"]["kernel"]
    np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_numpy_input_and_module_prefix(state_dict):
    from_torch = torch_to_flax(state_dict)
    from_numpy = torch_to_flax({f"module.{k}": v.numpy() for k, v in state_dict.items()})
    jax.tree.map(np.testing.assert_array_equal, from_torch, from_numpy)


def test_bfloat16_tensors_keep_their_dtype(state_dict):
    params = torch_to_flax({k: v.to(torch.bfloat16) for k, v in state_dict.items()})["params"]
    k = params["features_0"]["kernel"]
    assert k.dtype == jnp.bfloat16
    want = state_dict["features.0.weight"].to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(k.astype(np.float32), want)


@pytest.mark.slow
def test_num_classes_comes_from_classifier6(flax_variables):
    variables = flax_variables(0, 10)
    sd = flax_to_torch(variables)
    assert sd["classifier.6.weight"].shape == (10, 4096)
    assert torch_to_flax(sd)["params"]["classifier_6"]["kernel"].shape == (4096, 10)


def test_every_problem_is_listed_in_one_error(state_dict):
    bad = dict(state_dict)
    del bad["classifier.6.bias"], bad["features.8.weight"]
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    bad["fc.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(bad)
    message = str(e.value)
    assert "\n" not in message
    for name in (
        "classifier.6.bias",
        "features.8.weight",
        "fc.weight",
        "features.0.weight: got (64, 3, 5, 5), expected (64, 3, 11, 11)",
    ):
        assert name in message


def test_transposed_weight_is_a_shape_error(state_dict):
    bad = dict(state_dict)
    bad["classifier.6.weight"] = state_dict["classifier.6.weight"].T  # (4096, 1000): reads as 4096 classes
    with pytest.raises(ConversionError, match="classifier.6.bias: got \\(1000,\\), expected \\(4096,\\)"):
        torch_to_flax(bad)


def test_another_architecture_is_refused(torchvision):
    with pytest.raises(ConversionError, match="missing 16: features.0.weight.*unexpected .*conv1.weight"):
        torch_to_flax(torchvision.models.resnet18().state_dict())


@pytest.mark.parametrize("value", slow_after(1, [float("nan"), float("inf"), -float("inf")]))
def test_non_finite_refused_unless_allowed(state_dict, value):
    bad = dict(state_dict)
    bad["classifier.4.bias"] = state_dict["classifier.4.bias"].clone()
    bad["classifier.4.bias"][7] = value
    with pytest.raises(ConversionError, match="non-finite weights .* classifier.4.bias \\(1 values\\)"):
        torch_to_flax(bad)
    params = torch_to_flax(bad, allow_nonfinite=True)["params"]
    assert not np.isfinite(params["classifier_4"]["bias"][7])


def test_integer_weights_refused(state_dict):
    bad = dict(state_dict)
    bad["features.0.bias"] = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ConversionError, match="floating point.*features.0.bias \\(int64\\)"):
        torch_to_flax(bad)


@pytest.mark.parametrize("obj", [[1, 2], "features.0.weight", None])
def test_not_a_mapping(obj):
    with pytest.raises(ConversionError, match="expected a state_dict"):
        torch_to_flax(obj)


@pytest.mark.slow
def test_flax_tree_checked_too(flax_variables):
    variables = flax_variables()
    params = dict(variables["params"])
    params["classifier_4"] = {
        "kernel": params["classifier_4"]["kernel"][:, :100],
        "bias": params["classifier_4"]["bias"],
    }
    del params["features_10"]
    with pytest.raises(
        ConversionError,
        match="missing 2: features_10/kernel, features_10/bias.*classifier_4/kernel: got \\(4096, 100\\)",
    ):
        flax_to_torch({"params": params})


def test_round_trips_are_bit_exact(state_dict, flax_variables):
    variables = flax_variables()
    again = torch_to_flax(flax_to_torch(variables))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, again)
    back = flax_to_torch(torch_to_flax(state_dict))
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v.numpy())
