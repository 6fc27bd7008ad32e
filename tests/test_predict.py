"""Labels, predictions and features against torchvision, and the no-recompile promise.

Tolerance: logits and activations within 1e-4 of the largest absolute value of
the tensor compared (float32 convolutions summed in a different order differ by
~1e-6 of it; any wrong transform or layer moves them by O(1) of it). Top-5 classes
must match torchvision's exactly, in order.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import (
    IMAGENET_CLASSES,
    features,
    predict,
    predict_logits,
    preprocess_batch,
    torch_to_flax,
)
from alexnet_jax.inference.labels import class_names
from alexnet_jax.inference.predict import dtype_agreement, padded_size, predictions_from_logits, softmax
from alexnet_jax.models.alexnet import FEATURE_NAMES

# Every test here compares against torchvision (the module's fixtures load it).
pytestmark = pytest.mark.torch

RTOL = 1e-4
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation

# At 224x224, as the `features` docstring states.
FEATURE_SHAPES = {
    "relu1": (55, 55, 64),
    "relu2": (27, 27, 192),
    "relu3": (13, 13, 384),
    "relu4": (13, 13, 256),
    "relu5": (13, 13, 256),
    "fc7": (4096,),
}
# Where torchvision's AlexNet computes each of them (the ReLU modules).
TORCH_MODULES = {
    "relu1": "features.1",
    "relu2": "features.4",
    "relu3": "features.7",
    "relu4": "features.9",
    "relu5": "features.11",
    "fc7": "classifier.5",
}


@contextlib.contextmanager
def count_compiles():
    events: list[str] = []

    def listener(name, duration, **kwargs):
        if name == _COMPILE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def state_dict(torchvision_state_dict):
    return torchvision_state_dict(0)


@pytest.fixture(scope="module")
def variables(state_dict):
    return torch_to_flax(state_dict)


@pytest.fixture(scope="module")
def torch_model(torchvision, state_dict):
    model = torchvision.models.alexnet()
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def images(photos):
    return [photos[name] for name in ("chelsea", "coffee", "astronaut")]


@pytest.fixture(scope="module")
def torch_run(torchvision, torch_model, images):
    """torchvision's transforms and model on `images`: (logits, activations by our feature names, NHWC)."""
    import torch

    transforms = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    x = torch.stack([transforms(image) for image in images])
    captured = {}
    modules = dict(torch_model.named_modules())
    hooks = [
        modules[module].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone())
        )
        for name, module in TORCH_MODULES.items()
    ]
    try:
        with torch.no_grad():
            logits = torch_model(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    nhwc = {name: (a.numpy().transpose(0, 2, 3, 1) if a.ndim == 4 else a.numpy()) for name, a in captured.items()}
    return logits, nhwc


def _assert_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, what
    bound = RTOL * np.abs(reference).max()
    assert np.abs(ours - reference).max() <= bound, f"{what}: {np.abs(ours - reference).max():.3g} > {bound:.3g}"


def test_labels_are_torchvisions(torchvision):
    assert IMAGENET_CLASSES == tuple(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
    assert class_names(1000) is IMAGENET_CLASSES
    assert class_names(3) == ("class_0", "class_1", "class_2")


def test_predict_matches_torchvision(variables, images, torch_run):
    reference_logits, _ = torch_run
    _assert_close(predict_logits(variables, images, batch_size=4), reference_logits, "logits")
    reference_probabilities = np.asarray(jax.nn.softmax(reference_logits, axis=-1))
    for prediction, ref_logits, ref_probs in zip(
        predict(variables, images, batch_size=4), reference_logits, reference_probabilities
    ):
        expected = np.argsort(-ref_logits, kind="stable")[:5]
        assert prediction.indices == tuple(expected)
        assert prediction.labels == tuple(IMAGENET_CLASSES[i] for i in expected)
        np.testing.assert_allclose(prediction.probabilities, ref_probs[expected], rtol=RTOL)


def test_compile_counter_sees_compiles():
    # Guards the two tests below: an empty count must mean "no compile", not "not listening".
    with count_compiles() as compiles:
        jax.jit(lambda a: a + 1)(np.ones(7))
    assert len(compiles) == 1


def test_same_batch_shape_never_recompiles(variables, images):
    x = preprocess_batch(images)
    first = predict_logits(variables, x, batch_size=2)  # chunks of 2 and 1: compiles those two shapes
    with count_compiles() as compiles:
        second = predict_logits(variables, x, batch_size=2)
        six = predict_logits(variables, np.concatenate([x, x]), batch_size=2)  # three chunks of 2
    assert compiles == []
    np.testing.assert_array_equal(second, first)
    assert six.shape == (6, 1000)


def test_partial_batch_is_padded_and_dropped(variables, images):
    x = preprocess_batch(images)
    eight = np.concatenate([x, x, x[:2]])
    full = predict_logits(variables, eight, batch_size=8)  # one chunk of 8
    with count_compiles() as compiles:
        partial = predict_logits(variables, eight[:5], batch_size=8)  # 5 images, padded to 8
    assert compiles == []
    assert partial.shape == (5, 1000)
    np.testing.assert_array_equal(partial, full[:5])


def test_padded_size():
    assert [padded_size(n, 32) for n in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert [padded_size(n, 6) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]


def test_features_match_torchvision(variables, images, torch_run):
    _, reference = torch_run
    ours = features(variables, images, batch_size=4)
    assert tuple(ours) == FEATURE_NAMES
    for name, shape in FEATURE_SHAPES.items():
        assert ours[name].shape == (len(images), *shape), name
        assert ours[name].dtype == np.float32
        _assert_close(ours[name], reference[name], name)


def test_fc7_feeds_the_logits(variables, images):
    # fc7 is the input of the last layer: classifier_6 applied to it gives the logits.
    fc7 = features(variables, images[:2], batch_size=2)["fc7"]
    head = variables["params"]["classifier_6"]
    logits = predict_logits(variables, images[:2], batch_size=2)
    _assert_close(fc7 @ head["kernel"] + head["bias"], logits, "fc7 @ classifier_6")


def test_bare_params_tree_and_wrong_tree(variables, images):
    with_key = predict_logits(variables, images[:1], batch_size=1)
    np.testing.assert_array_equal(predict_logits(variables["params"], images[:1], batch_size=1), with_key)
    broken = {"params": {k: v for k, v in variables["params"].items() if k != "classifier_4"}}
    with pytest.raises(ValueError, match="missing 2: classifier_4/kernel, classifier_4/bias"):
        predict(broken, images[:1])


def test_empty_batch(variables):
    assert predict_logits(variables, []).shape == (0, 1000)
    assert predict(variables, []) == []
    assert {name: a.shape for name, a in features(variables, []).items()} == {
        name: (0, *shape) for name, shape in FEATURE_SHAPES.items()
    }


@pytest.mark.slow  # float32 parity is the fast representative
def test_bfloat16_compute(variables, images):
    float32 = predict_logits(variables, images, batch_size=4)
    bf16 = predict_logits(variables, images, batch_size=4, dtype=jnp.bfloat16)
    assert bf16.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: the logits must move (it did compute in bf16), by a few percent at most.
    scale = np.abs(float32).max()
    assert 0 < np.abs(bf16 - float32).max() <= 0.05 * scale
    report = dtype_agreement(variables, images, batch_size=4)
    assert report.dtype == "bfloat16" and report.logits.num_images == len(images)
    assert report.logits.max_abs_diff == pytest.approx(np.abs(bf16 - float32).max())
    assert report.logits.top5_agree <= report.logits.top5_same_set <= len(images)
    assert f"top-1 agree {report.logits.top1_agree}/3" in report.summary()


def test_predictions_from_logits():
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    first, second = predictions_from_logits(logits, k=2)
    assert first.indices == (1, 2) and first.labels == ("class_1", "class_2")
    np.testing.assert_allclose(first.probabilities, (0.6, 0.3), rtol=1e-6)
    assert second.indices == (0, 2)
    assert str(first) == "class_1 0.600; class_2 0.300"
    np.testing.assert_allclose(softmax(logits).sum(-1), 1.0, rtol=1e-6)


def test_bad_arguments(variables, images):
    with pytest.raises(ValueError, match="k must be between 1 and the number of classes"):
        predictions_from_logits(np.zeros((1, 10)), k=11)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        predict_logits(variables, images[:1], batch_size=0)
    with pytest.raises(TypeError, match="got one PIL image; wrap it in a list"):
        predict(variables, images[0])
    with pytest.raises(ValueError, match=r"must be NHWC \(N, H, W, 3\)"):
        predict_logits(variables, np.zeros((1, 3, 224, 224), np.float32))


def test_features_choice_of_layers(variables, images):
    got = features(variables, images[:1], layers=("fc7", "relu2"))
    assert list(got) == ["fc7", "relu2"] and got["fc7"].shape == (1, 4096)
    with pytest.raises(ValueError, match=r"unknown feature layers \['pool5'\]"):
        features(variables, images[:1], layers=["pool5"])
