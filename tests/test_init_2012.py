"""AlexNet2012's initializations (`alexnet2012.INITS`): each as its source gives it, chosen by name, also for new heads.

The expected numbers are written out here from the sources, not read from the table under
test: the paper's section 5; Caffe's models/bvlc_alexnet/train_val.prototxt; cuda-convnet2's
layers/layers-imagenet-1gpu.cfg. Standard deviations within 2% (sampling error of the
per-channel std of conv1, 11,616 draws: about 0.7%); biases exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alexnet_jax.training.loop as train_loop
from alexnet_jax import AlexNet2012
from alexnet_jax.archs import TRAINING_INIT, get_arch
from alexnet_jax.models.alexnet2012 import INIT_NAMES, PIXELS_PER_UNIT, bias_init, kernel_init, replace_head
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.run import resolve_run
from alexnet_jax.transforms.preprocess import STDDEV_RGB

from helpers import COLOURS, colour_folder

LAYERS = ("features_0", "features_4", "features_8", "features_10", "features_12")
LAYERS += ("classifier_1", "classifier_4", "classifier_6")
# layer -> (weight std in the source's pixel units, bias), per source.
SOURCES = {
    "paper": dict(zip(LAYERS, [(0.01, b) for b in (0, 1, 0, 1, 1, 1, 1, 0)], strict=True)),
    "caffe": {
        "features_0": (0.01, 0),
        "features_4": (0.01, 0.1),
        "features_8": (0.01, 0),
        "features_10": (0.01, 0.1),
        "features_12": (0.01, 0.1),
        "classifier_1": (0.005, 0.1),
        "classifier_4": (0.005, 0.1),
        "classifier_6": (0.01, 0),
    },
    "cuda-convnet2": {
        "features_0": (0.01, 0),
        "features_4": (0.01, 1),
        "features_8": (0.03, 0),
        "features_10": (0.03, 1),
        "features_12": (0.03, 1),
        "classifier_1": (0.01, 1),
        "classifier_4": (0.01, 1),
        "classifier_6": (0.01, -7),
    },
}


def test_the_table_names_the_three_sources():
    assert INIT_NAMES == ("paper", "caffe", "cuda-convnet2")
    assert TRAINING_INIT in INIT_NAMES and get_arch("2012").init == TRAINING_INIT


def test_conv1_is_drawn_in_the_pixel_units_of_the_preprocessing():
    # One normalized input unit is 255 x the channel's std of pixel levels (transforms.preprocess).
    np.testing.assert_allclose(PIXELS_PER_UNIT, 255 * np.asarray(STDDEV_RGB), rtol=1e-12)


def _check(init: str, params) -> None:
    for name, (std, bias) in SOURCES[init].items():
        kernel = np.asarray(params[name]["kernel"], np.float64)
        if name == "features_0":  # per input channel, converted from pixel units
            got = kernel.std(axis=(0, 1, 3)) / np.asarray(PIXELS_PER_UNIT)
        else:
            got = np.asarray([kernel.std()])
        np.testing.assert_allclose(got, std, rtol=0.02, err_msg=f"{init} {name}")
        assert abs(kernel.mean()) < 5 * kernel.std() / np.sqrt(kernel.size), (init, name)
        assert np.all(np.asarray(params[name]["bias"]) == np.float32(bias)), (init, name)


@pytest.mark.parametrize("init", INIT_NAMES)
def test_each_initialization_is_its_sources(init):
    # The initializers on 160,000 draws per layer (their std does not depend on the shape but
    # for conv1's, converted per input channel: drawn at its own shape). The model's use of
    # them is the next test's.
    key = jax.random.key(0)
    params = {
        name: {
            "kernel": kernel_init(name, init)(key, (11, 11, 3, 96) if name == "features_0" else (400, 400)),
            "bias": bias_init(name, init)(key, (8,)),
        }
        for name in LAYERS
    }
    _check(init, params)


@pytest.mark.slow
def test_the_model_draws_the_initialization_it_is_given():
    model = AlexNet2012(num_classes=10, initialization="cuda-convnet2")  # the one furthest from the default
    _check("cuda-convnet2", jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))["params"])


def test_an_unknown_init_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown init 'he'; expected one of paper, caffe, cuda-convnet2"):
        AlexNet2012(initialization="he").init(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))
    with pytest.raises(ValueError, match=r"unknown init 'he' for --arch 2012; expected one of paper, caffe"):
        TrainConfig(data="d", val_data="v", arch="2012", init="he").validate()
    with pytest.raises(ValueError, match=r"--init chooses among the 2012 network's .* --arch torchvision has one"):
        TrainConfig(data="d", val_data="v", init="caffe").validate()
    with pytest.raises(ValueError, match=r"parallel 'towers' is the 2012 network's .* --arch torchvision has none"):
        TrainConfig(data="d", val_data="v", parallel="towers").validate()


def test_towers_on_one_device_is_refused_before_the_data_is_read(tmp_path):
    config = TrainConfig(data=str(tmp_path / "absent"), val_data=str(tmp_path / "absent"), arch="2012")
    with pytest.raises(ValueError, match=r"the two-tower layout needs an even number of devices .* got 1"):
        resolve_run(TrainConfig(**{**vars(config), "parallel": "towers"}))


@pytest.mark.parametrize("init", ["caffe", "cuda-convnet2"])
def test_a_replaced_head_is_drawn_as_the_init_draws_it(init):
    old = {"classifier_6": {"kernel": np.zeros((4096, 1000), np.float32), "bias": np.zeros(1000, np.float32)}}
    head = replace_head(old, 7, seed=3, init=init)["classifier_6"]
    std, bias = SOURCES[init]["classifier_6"]
    assert head["kernel"].shape == (4096, 7) and head["kernel"].dtype == np.float32
    assert abs(float(np.std(head["kernel"])) / std - 1) < 0.02
    assert np.all(np.asarray(head["bias"]) == bias)


def test_fine_tuning_the_2012_network_draws_the_head_of_the_runs_init(tmp_path, monkeypatch):
    # The loop's path: --init-from weights of 1000 classes onto a 2-class folder, --init cuda-convnet2.
    shapes = jax.eval_shape(AlexNet2012().init, jax.random.key(0), jnp.zeros((1, 227, 227, 3)))
    monkeypatch.setattr(train_loop, "load_variables", lambda path, device: shapes)
    data = colour_folder(tmp_path / "train", 1, 0, colours=COLOURS[:2], shape=(8, 8))
    config = TrainConfig(
        data=str(data), val_data=str(data), arch="2012", batch_size=2, init="cuda-convnet2", init_from="w.msgpack"
    )
    params = train_loop._initial_params(resolve_run(config))
    assert np.all(np.asarray(params["classifier_6"]["bias"]) == -7.0)  # LeCun's head would have bias 0
    assert params["classifier_6"]["kernel"].shape == (4096, 2)
    assert params["features_0"] == shapes["params"]["features_0"]  # the body kept as loaded
