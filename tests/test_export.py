"""Export: each artifact, read back, computes what `apply` computes, at several sizes; ONNX matches torchvision.

StableHLO artifacts are serialized and deserialized, then called on batches and sizes
other than the ones they were traced with (symbolic batch, height and width); they must
agree with the JAX functions to float32 rounding. The ONNX model runs in ONNX Runtime
against `AlexNet.apply` and against torchvision's own module with seeded weights on real
photos: logits within 1e-5 of the largest, the same top-5.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import AlexNet, lpips, preprocess_batch, save_variables, torch_to_flax, trunk_features
from alexnet_jax.cli import run as cli_run
from alexnet_jax.export.artifact import export_file
from alexnet_jax.export.stablehlo import ExportError, export_model, load_exported, serialize

# (batch, height, width): the smallest sides each target takes, 224, and odd sides whose
# adaptive-pool windows overlap unevenly.
CLASSIFIER_SHAPES = ((2, 63, 63), (1, 224, 224), (3, 100, 77))
TRUNK_SHAPES = ((1, 31, 31), (2, 57, 40))
RTOL = 1e-5  # of the largest |value|: float32 rounding
_apply = jax.jit(AlexNet().apply)  # one function for every test: each shape compiles once


def _images(shape, seed=0):
    b, h, w = shape
    return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


def _close(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max()


def _trunk(variables, x, layers):
    """`trunk_features` compiled whole (eager, op by op, it takes longer here than one compilation)."""
    return jax.jit(trunk_features, static_argnums=2)(variables, x, tuple(layers))


def _round_trip(exported):
    return jax.export.deserialize(bytearray(serialize(exported)))


@pytest.fixture(scope="module")
def seeded(torchvision_state_dict):
    """(torchvision's state_dict under seed 3, the same weights converted to Flax variables)."""
    state_dict = torchvision_state_dict(seed=3)
    return state_dict, torch_to_flax(state_dict)


@pytest.mark.slow
@pytest.mark.torch
def test_classifier_artifact_matches_apply_at_every_batch_and_size(seeded):
    _, variables = seeded
    exported = _round_trip(export_model(variables, platforms=("cpu", "cuda", "tpu"), embed_weights=False))
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert str(exported.in_avals[-1].shape) == "(b, h, w, 3)"
    for shape in CLASSIFIER_SHAPES:
        x = _images(shape)
        _close(exported.call({"params": variables["params"]}, x), _apply(variables, x))


@pytest.mark.slow
def test_trunk_and_lpips_artifacts_match_at_every_size(trunk_variables, tmp_path):
    layers = ("relu2", "relu5")
    # The trunk with its weights inside (the images its one argument), LPIPS with them as an argument.
    path = export_file(trunk_variables, tmp_path / "trunk.jax_exported", "stablehlo", "trunk", layers=layers)
    trunk = load_exported(path)
    assert [str(a.shape) for a in trunk.in_avals] == ["(b, h, w, 3)"]
    params = lpips.load(trunk_variables)
    distance = _round_trip(export_model(trunk_variables, "lpips", embed_weights=False))
    for shape in TRUNK_SHAPES:
        x0 = np.tanh(_images(shape))  # LPIPS's [-1, 1]
        got, want = trunk.call(x0), _trunk(trunk_variables, x0, layers)
        assert list(got) == sorted(layers)
        for name in layers:
            _close(got[name], want[name])
    x1 = np.tanh(_images(shape, seed=1))
    _close(distance.call(params, x0, x1), lpips.distance(params, x0, x1))
    with pytest.raises(ExportError, match="not a jax.export artifact"):
        load_exported(__file__)


def test_export_refusals(trunk_variables, tmp_path, capsys):
    variables = trunk_variables  # every refusal comes before the weights are read
    with pytest.raises(ExportError, match="unknown export target 'pool5'"):
        export_model(variables, "pool5")
    with pytest.raises(ExportError, match="platforms must be some of cpu, cuda, tpu, got rocm"):
        export_model(variables, platforms=("rocm",))
    with pytest.raises(ExportError, match="the classifier takes sides of at least 63, got size 62"):
        export_model(variables, dynamic_size=False, size=62)
    with pytest.raises(ExportError, match="ONNX export makes one of classifier, trunk, not 'lpips'"):
        export_file(variables, tmp_path / "x.onnx", "onnx", "lpips")
    for argv, message in (
        (["--size", "30", "--model", "trunk"], "--size: the trunk takes sides of at least 31"),
        (["--platforms", "cpu,gpu"], "--platforms takes some of cpu,cuda,tpu, got cpu,gpu"),
        (["--format", "onnx", "--platforms", "cuda"], "platforms and weights as an argument are stablehlo options"),
    ):
        fmt = [] if "--format" in argv else ["--format", "stablehlo"]
        with pytest.raises(SystemExit) as e:
            cli_run(["export", "--weights", "w.msgpack", "--output", str(tmp_path / "o"), *fmt, *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("fmt, package", [("onnx", "onnx"), ("stablehlo", "flatbuffers")])
def test_a_missing_export_extra_is_one_line_before_the_weights_are_read(fmt, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import onnx` raises ImportError
    argv = ["export", "--weights", "missing.msgpack", "--format", fmt, "--output", str(tmp_path / "o")]
    assert cli_run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"needs {package}" in err, err
    assert "pip install 'alexnet-jax[export]'" in err and "missing.msgpack" not in err


@pytest.fixture(scope="module")
def onnxruntime():
    return pytest.importorskip("onnxruntime")


def _session(onnxruntime, path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.torch
def test_onnx_classifier_matches_jax_and_torchvision_on_photos(onnxruntime, torchvision, seeded, photos, tmp_path):
    import torch

    state_dict, variables = seeded
    session = _session(onnxruntime, export_file(variables, tmp_path / "alexnet.onnx", "onnx"))
    x = preprocess_batch(photos.values())
    got = session.run(["logits"], {"images": x})[0]
    module = torchvision.models.alexnet()
    module.load_state_dict(state_dict)
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    jax_logits = np.asarray(_apply(variables, x))
    for reference in (want, jax_logits):
        _close(got, reference)
        np.testing.assert_array_equal(np.argsort(-got)[:, :5], np.argsort(-reference)[:, :5])
    # Other batches and sizes, dynamic in the graph: against the JAX model.
    for shape in CLASSIFIER_SHAPES[::2]:
        images = _images(shape)
        _close(session.run(None, {"images": images})[0], _apply(variables, images))


@pytest.mark.slow
def test_onnx_trunk_matches_trunk_features(onnxruntime, trunk_variables, tmp_path):
    layers = ("relu1", "relu4")
    session = _session(
        onnxruntime, export_file(trunk_variables, tmp_path / "trunk.onnx", "onnx", "trunk", layers=layers)
    )
    assert [o.name for o in session.get_outputs()] == list(layers)
    for shape in TRUNK_SHAPES:
        x = _images(shape)
        want = _trunk(trunk_variables, x, layers)
        for name, got in zip(layers, session.run(None, {"images": x})):
            _close(got, want[name])


@pytest.mark.slow
@pytest.mark.torch
def test_cli_exports_a_weights_file(onnxruntime, seeded, tmp_path, capsys):
    _, variables = seeded
    weights = save_variables(tmp_path / "alexnet.msgpack", variables["params"])  # bare params: saved under "params"
    out = tmp_path / "trunk.onnx"
    argv = ["export", "--weights", str(weights), "--format", "onnx", "--model", "trunk", "--output", str(out)]
    assert cli_run([*argv, "--layers", "relu3", "--size", "40"]) == 0
    assert f"wrote {out} (onnx, trunk, dynamic batch, 40x40" in capsys.readouterr().err
    session = _session(onnxruntime, out)
    assert session.get_inputs()[0].shape == ["N", 40, 40, 3]
    x = _images((3, 40, 40))
    _close(session.run(None, {"images": x})[0], _trunk(variables, x, ("relu3",))["relu3"])


def test_pool_weights_on_symbolic_sides_are_the_numpy_matrix():
    from alexnet_jax.models.layers import _pool_weights, adaptive_pool_matrix

    (h,) = jax.export.symbolic_shape("h")
    exported = jax.export.export(jax.jit(lambda x: _pool_weights(x.shape[0], 6, jnp.float32)))(
        jax.ShapeDtypeStruct((h,), jnp.float32)
    )
    for size in (1, 5, 6, 7, 13, 27, 100):
        np.testing.assert_array_equal(exported.call(np.zeros(size, np.float32)), adaptive_pool_matrix(size))
