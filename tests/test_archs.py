"""The architectures' name tables: `archs.register_arch`, and the tests' tiny network that enters through it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import check_variables, load_variables, model_for, replace_head, save_variables, variables_architecture
from alexnet_jax.archs import ARCHS, get_arch, register_arch
from alexnet_jax.models.variables import ARCHITECTURES, CLASSIFIER, ConversionError, param_shapes
from alexnet_jax.steps import freeze_labels, init_params

from tiny_arch import ARCH, LAYOUT, NAME, TinyAlexNet, registered, tiny_model

# What the package's own tables hold, whatever a test registered before this module ran.
BUILT_IN = ("torchvision", "2012")


def test_the_package_tables_hold_the_two_networks_and_nothing_else():
    assert tuple(ARCHS) == tuple(ARCHITECTURES) == BUILT_IN
    assert all(ARCHITECTURES[name].classifier == CLASSIFIER for name in BUILT_IN)


def test_register_adds_one_entry_to_each_table_and_refuses_a_name_taken():
    with registered() as name:
        assert name == NAME and get_arch(NAME) is ARCH and ARCHITECTURES[NAME] is LAYOUT
        assert tuple(ARCHS) == tuple(ARCHITECTURES) == (*BUILT_IN, NAME)
        with pytest.raises(ValueError, match="arch 'tiny' is already registered; choose another name"):
            register_arch(ARCH, LAYOUT)
    for taken in BUILT_IN:
        with pytest.raises(ValueError, match=f"arch '{taken}' is already registered"):
            register_arch(dataclasses.replace(ARCH, name=taken), dataclasses.replace(LAYOUT, name=taken))
    with pytest.raises(ValueError, match="arch 'tiny' and its layout 'other' must have the same name"):
        register_arch(ARCH, dataclasses.replace(LAYOUT, name="other"))
    # Refused registrations leave both tables as they were; the context took its entries out.
    assert tuple(ARCHS) == tuple(ARCHITECTURES) == BUILT_IN
    with pytest.raises(ValueError, match="unknown arch 'tiny'; expected one of torchvision, 2012"):
        get_arch(NAME)


def test_the_tiny_layout_is_the_tiny_model_and_the_package_recognizes_its_trees(tmp_path):
    """Its init has exactly the shapes its layout declares, and files, checks and the fine-tuning helpers
    (head replacement, the frozen conv layers) treat it as they treat AlexNet's."""
    with registered():
        params = init_params(tiny_model(5), seed=0, image_size=64)
        assert {f"{m}/{leaf}": v.shape for m, leaves in params.items() for leaf, v in leaves.items()} == dict(
            param_shapes(5, NAME)
        )
        assert check_variables({"params": params}) == 5 and variables_architecture(params) == NAME
        assert model_for({"params": params}) == TinyAlexNet(num_classes=5)
        save_variables(tmp_path / "tiny.msgpack", {"params": params})
        jax.tree.map(np.testing.assert_array_equal, load_variables(tmp_path / "tiny.msgpack")["params"], params)
        fresh = replace_head(params, 3)
        assert fresh["classifier_6"]["kernel"].shape == (4096, 3) and check_variables(fresh, NAME) == 3
        labels = freeze_labels(params)
        assert {labels[m]["kernel"] for m in ("features_0", "features_3")} == {"frozen"}
        assert {labels[m]["kernel"] for m in ("classifier_1", "classifier_4", "classifier_6")} == {"trained"}
        logits = TinyAlexNet(num_classes=5).apply({"params": params}, jnp.zeros((2, 64, 64, 3)))
        assert logits.shape == (2, 5)
    # Unregistered, the same tree is refused by name, against the closest of the package's two.
    with pytest.raises(ConversionError, match="variable tree is not torchvision's AlexNet"):
        check_variables(params)
