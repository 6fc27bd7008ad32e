"""Training the 2012 paper's AlexNet: its momentum rule, ten-crop evaluation, defaults, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import alexnet_jax.training.loop as train_loop
from alexnet_jax import AlexNet, ConversionError, load_variables
from alexnet_jax.inference.predict import predict_logits
from alexnet_jax.models.variables import variables_architecture
from alexnet_jax.steps import (
    create_train_state,
    crop_averaged_logits,
    eval_step,
    make_optimizer,
    set_learning_rate,
    summarize_eval,
)
from alexnet_jax.training.checkpoint import Checkpoints
from alexnet_jax.training.config import TrainConfig
from alexnet_jax.training.loop import train_and_evaluate
from alexnet_jax.training.metrics import read_metrics

from helpers import COLOURS, colour_folder, run_python


def _run_rule(rule: str, lrs: list[float], grads: list[np.ndarray], w0: np.ndarray, wd: float) -> np.ndarray:
    """Parameters after one update per gradient, the rate set to lrs[t] before update t (as the plateau rule does)."""
    tx = make_optimizer(lrs[0], weight_decay=wd, rule=rule)
    state = create_train_state(nn.Dense(1), {"w": jnp.asarray(w0)}, tx, seed=0)
    for lr, g in zip(lrs, grads):
        state = set_learning_rate(state, lr).apply_gradients(grads={"w": jnp.asarray(g)})
    return np.asarray(state.params["w"], np.float64)


def test_paper_rule_is_the_papers_update_and_torch_rule_only_at_a_constant_rate():
    """v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v (section 5), in float64 numpy against float32: 1e-6."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=5).astype(np.float32)
    grads = [rng.normal(size=5).astype(np.float32) for _ in range(6)]
    lrs = [0.01] * 3 + [0.001] * 3  # the plateau rule's /10 after step 3

    def paper(lrs):
        w, v = w0.astype(np.float64), np.zeros(5)
        for eps, g in zip(lrs, grads):
            v = 0.9 * v - 0.0005 * eps * w - eps * g
            w = w + v
        return w

    np.testing.assert_allclose(_run_rule("paper", lrs, grads, w0, 5e-4), paper(lrs), rtol=1e-6, atol=1e-7)
    # At a constant rate torch's formulation is the same update ...
    constant = [0.01] * 6
    np.testing.assert_allclose(_run_rule("torch", constant, grads, w0, 5e-4), paper(constant), rtol=1e-6, atol=1e-7)
    # ... and after the drop it is not: it rescales the whole momentum by the new rate at once.
    assert np.abs(_run_rule("torch", lrs, grads, w0, 5e-4) - paper(lrs)).max() > 1e-4


def test_ten_crop_eval_averages_the_softmax():
    """eval_step on (N, 10, H, W, 3) scores the mean softmax of the crops; float32 sums, 1e-6 relative."""
    images = np.random.default_rng(1).normal(size=(2, 10, 4, 4, 3)).astype(np.float32)

    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3, name="Dense_0")(x.reshape((x.shape[0], -1)))

    params = Flat().init(jax.random.key(0), images[0])["params"]
    state = create_train_state(Flat(), params, make_optimizer(0.1), seed=0)
    batch = {"image": images, "label": np.array([0, 2], np.int32), "mask": np.ones(2, np.float32)}
    got = summarize_eval([eval_step(state, batch)])
    logits = np.asarray(Flat().apply({"params": params}, images.reshape(20, 4, 4, 3)), np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    mean = (probabilities / probabilities.sum(-1, keepdims=True)).reshape(2, 10, 3).mean(axis=1)
    assert got["loss"] == pytest.approx(-np.mean(np.log(mean[[0, 1], [0, 2]])), rel=1e-6)
    assert got["top1"] == np.mean(mean.argmax(-1) == [0, 2])
    np.testing.assert_allclose(np.exp(crop_averaged_logits(jnp.asarray(logits), 10)), mean, rtol=1e-6)


def test_paper_optimizer_state_checkpoints_and_restores(tmp_path):
    tx = make_optimizer(0.01, weight_decay=5e-4, rule="paper")
    state = create_train_state(nn.Dense(1), {"w": jnp.arange(3.0)}, tx, seed=0)
    state = set_learning_rate(state.apply_gradients(grads={"w": jnp.ones(3)}), 0.001)
    checkpoints = Checkpoints(tmp_path, async_save=False)
    checkpoints.save(state, {"epoch": 0})
    template = create_train_state(nn.Dense(1), {"w": jnp.zeros(3)}, tx, seed=0)
    restored, _ = checkpoints.restore(template)
    checkpoints.close()
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert float(restored.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.001)


def test_arch_defaults_and_refusals():
    config = TrainConfig(data="t", val_data="v", arch="2012").with_arch_defaults()
    assert (config.image_size, config.batch_size, config.recipe) == (227, 128, "paper")
    resolved = TrainConfig(data="t", val_data="v", arch="2012", batch_size=64).resolved(10)
    assert (resolved.lr, resolved.weight_decay) == (pytest.approx(0.005), 5e-4)  # 0.01 at the paper's 128
    torchvision = TrainConfig(data="t", val_data="v").resolved(10)
    assert (torchvision.image_size, torchvision.batch_size, torchvision.recipe, torchvision.lr) == (
        224,
        256,
        "torchvision",
        pytest.approx(0.01),
    )
    cases = [
        (dict(arch="2012", image_size=224), r"image-size must be 227 to 256 for --arch 2012 .*got 224"),
        (dict(arch="2012", image_size=257), r"image-size must be 227 to 256 for --arch 2012 .*got 257"),
        (dict(arch="2012", conv_algorithm="winograd"), "conv-algorithm 'winograd' is not available for --arch 2012"),
        (dict(arch="2013"), "unknown arch '2013'; expected one of torchvision, 2012"),
        (dict(eval_crops=5), "eval-crops must be one of 1, 10, got 5"),
        (dict(colour_pca="lab"), "unknown colour-pca 'lab'; expected one of imagenet, folder, none"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig(data="t", val_data="v", **fields).validate()


def _folder(root: Path, per_class: int, seed: int) -> Path:
    # Two colour classes of small images, which the 2012 transforms resize to 256 first.
    return colour_folder(root, per_class, seed, colours=(COLOURS[0], COLOURS[2]), shape=(40, 48), noise=30)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cli_trains_the_2012_arch_on_two_devices_end_to_end(tmp_path):
    """examples/train.py --arch 2012, sharded over 2 CPU devices, ten-crop validation, colour PCA of the folder.

    The logged validation loss is recomputed from final.msgpack by `predict` on one
    device: 1e-4 relative (the same float32 math, summed in another order).
    """
    train, val = _folder(tmp_path / "train", 2, 0), _folder(tmp_path / "val", 1, 1)
    workdir = tmp_path / "run"
    args = ["--arch", "2012", "--data", train, "--val-data", val, "--workdir", workdir, "--batch-size", "2"]
    args += ["--epochs", "1", "--eval-crops", "10", "--colour-pca", "folder", "--parallel", "sharded"]
    run = run_python(
        ["examples/train.py", *args, "--workers", "0", "--no-progress", "--save-every", "0"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert run.returncode == 0, run.stderr
    (last,) = read_metrics(workdir / "metrics.jsonl")
    assert last["step"] == 2 and last["lr"] == pytest.approx(0.01 * 2 / 128)
    saved = json.loads((workdir / "config.json").read_text())
    assert {k: saved[k] for k in ("arch", "image_size", "recipe", "weight_decay")} == {
        "arch": "2012",
        "image_size": 227,
        "recipe": "paper",
        "weight_decay": 5e-4,
    }
    pca = json.loads((workdir / "colour_pca.json").read_text())
    assert len(pca["eigvals"]) == 3 and pca["eigvals"][0] >= pca["eigvals"][1] >= pca["eigvals"][2] >= 0
    assert Checkpoints(workdir / "checkpoints").latest_step() == 2

    variables = load_variables(workdir / "final.msgpack")
    assert variables_architecture(variables) == "2012"  # AlexNet2012's tree, which predict runs with it
    images = [Image.open(p) for p in sorted(val.glob("*/*.png"))]
    log_probabilities = predict_logits(variables, images, crops=10)  # the arch read from the variables
    loss = -np.mean(log_probabilities[[0, 1], [0, 1]])
    assert loss == pytest.approx(last["val_loss"], rel=1e-4)


def test_weights_of_the_other_arch_are_refused_before_training(tmp_path, monkeypatch):
    # The torchvision model's parameter shapes, traced abstractly: the check reads shapes only.
    tree = jax.eval_shape(AlexNet(num_classes=2).init, jax.random.key(0), jnp.zeros((1, 63, 63, 3)))
    monkeypatch.setattr(train_loop, "load_variables", lambda path, device: tree)
    data, val = _folder(tmp_path / "train", 1, 0), _folder(tmp_path / "val", 1, 1)
    config = TrainConfig(data=str(data), val_data=str(val), arch="2012", batch_size=2, init_from="tv.msgpack")
    with pytest.raises(ConversionError, match="is not the 2012 paper's AlexNet2012"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "final.msgpack").exists()
