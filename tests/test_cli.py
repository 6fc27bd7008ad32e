"""`python convert/torch_to_flax.py`: good inputs convert and verify; every bad input is one line, exit 1, no file."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from alexnet_jax import AlexNet, load_variables
from alexnet_jax.models.trees import cast_floating

from helpers import REPO, load_script, run_python

# The module imports torch (or lpips): every test in it needs them.
pytestmark = pytest.mark.torch

SCRIPT = REPO / "convert" / "torch_to_flax.py"


cli = load_script(SCRIPT)


class _Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def files(tmp_path_factory, torchvision, torchvision_state_dict):
    d = tmp_path_factory.mktemp("checkpoints")
    sd = torchvision_state_dict(0)
    torch.save(sd, d / "good.pth")
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in sd.items()}}, d / "trainer.pt")
    from safetensors.torch import save_file

    save_file(sd, d / "good.safetensors")
    data = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "truncated.safetensors").write_bytes((d / "good.safetensors").read_bytes()[:5000])
    torch.save({"epoch": 3, "lr": 0.1}, d / "not_a_state_dict.pth")
    torch.save(torchvision.models.resnet18().state_dict(), d / "resnet18.pth")
    wrong = dict(sd)
    wrong["classifier.4.weight"] = torch.zeros(4096, 2048)
    torch.save(wrong, d / "wrong_shape.pth")
    nan = dict(sd)
    nan["features.3.bias"] = sd["features.3.bias"].clone()
    nan["features.3.bias"][0] = float("nan")
    torch.save(nan, d / "nan.pth")
    marker = d / "PWNED"
    torch.save({"features.0.weight": _Evil(marker)}, d / "malicious.pth")
    with open(d / "malicious_raw.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    return d


def _run(*args, cwd, env=None):
    """The script as a user runs it, in a fresh process."""
    return run_python([SCRIPT, *args], cwd=cwd, env=env)


def _logits(variables_or_sd, x, *, torch_side=False):
    if torch_side:
        from alexnet_jax.weights.reference import torch_alexnet

        model, _ = torch_alexnet(variables_or_sd, 1000)
        with torch.no_grad():
            return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    return np.asarray(AlexNet().apply(variables_or_sd, x))


@pytest.mark.slow
def test_converts_and_verifies_a_torchvision_pth(files, tmp_path, torchvision_state_dict):
    out = tmp_path / "alexnet.msgpack"
    result = _run("--checkpoint", files / "good.pth", "--output", out, "--verify", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "verify: OK: 4 images" in result.stdout
    assert "top-5 agree 4/4" in result.stdout
    # Honest about the source: seeded weights are never called torchvision's pretrained ones.
    assert "not torchvision's IMAGENET1K_V1 file" in result.stdout
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    want = _logits(torchvision_state_dict(0), x, torch_side=True)
    got = _logits(load_variables(out), x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("source, output", [("trainer.pt", "t.msgpack"), ("good.safetensors", "s.safetensors")])
@pytest.mark.slow
def test_other_checkpoint_layouts(files, tmp_path, capsys, source, output):
    assert cli.main(["--checkpoint", str(files / source), "--output", str(tmp_path / output)]) == 0
    assert "converted: 16 tensors, 61,100,840 parameters, 1000 classes" in capsys.readouterr().out
    loaded = load_variables(tmp_path / output)
    from alexnet_jax import torch_to_flax

    want = torch_to_flax(torch.load(files / "good.pth", weights_only=True))
    for module, leaves in want["params"].items():
        for leaf, value in leaves.items():
            np.testing.assert_array_equal(loaded["params"][module][leaf], value)


BAD_INPUTS = {
    "missing.pth": "missing.pth: no such file",
    "truncated.pth": "truncated.pth: truncated or corrupt",
    "garbage.pth": "garbage.pth: refused: corrupt, or a pickle",
    "truncated.safetensors": "truncated.safetensors: truncated or corrupt safetensors file",
    "not_a_state_dict.pth": "not_a_state_dict.pth: not a state_dict: found a dict without tensors",
    "resnet18.pth": "state_dict is not torchvision's AlexNet: missing 16: features.0.weight",
    "wrong_shape.pth": "shape mismatch 1: classifier.4.weight: got (4096, 2048), expected (4096, 4096)",
    "nan.pth": "non-finite weights (NaN or Inf) in features.3.bias (1 values)",
    "malicious.pth": "malicious.pth: refused: the file asks to run code (posix.system); it was not executed",
    "malicious_raw.pkl": "malicious_raw.pkl: refused:",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_no_file(files, tmp_path, capsys, name):
    out = tmp_path / "out.msgpack"
    assert cli.main(["--checkpoint", str(files / name), "--output", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert BAD_INPUTS[name] in err
    assert os.listdir(tmp_path) == []  # no output, no temporary file
    assert not (files / "PWNED").exists()


@pytest.mark.slow
def test_malicious_pickle_is_never_executed_in_a_real_run(files, tmp_path):
    result = _run("--checkpoint", files / "malicious.pth", "--output", tmp_path / "o.msgpack", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {files / 'malicious.pth'}: refused: the file asks to run code (posix.system); it was not executed"
    ]
    assert not (files / "PWNED").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_nonfinite_allowed_with_flag(files, tmp_path):
    out = tmp_path / "nan.msgpack"
    assert cli.main(["--checkpoint", str(files / "nan.pth"), "--output", str(out), "--allow-nonfinite"]) == 0
    assert np.isnan(load_variables(out)["params"]["features_3"]["bias"][0])


@pytest.mark.slow
def test_verify_mismatch_exits_3_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    """A converter bug (the square fc7 weight left untransposed) is caught by --verify."""
    from alexnet_jax.weights import convert

    to_flax, to_torch = convert._TRANSFORMS["linear"]
    buggy = (lambda w: w if w.shape[0] == w.shape[1] else to_flax(w), to_torch)
    monkeypatch.setitem(convert._TRANSFORMS, "linear", buggy)
    out = tmp_path / "out.msgpack"
    assert cli.main(["--checkpoint", str(files / "good.pth"), "--output", str(out), "--verify"]) == cli.EXIT_MISMATCH
    captured = capsys.readouterr()
    assert "verify: MISMATCH" in captured.out
    assert "was not written" in captured.err
    assert os.listdir(tmp_path) == []


def test_output_errors(files, tmp_path, capsys):
    assert cli.main(["--checkpoint", str(files / "good.pth"), "--output", str(tmp_path / "no" / "o.msgpack")]) == 1
    assert "folder" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(files / "good.pth"), "--url", "file:///x-12345678.pth"]) == 1
    assert "not both" in capsys.readouterr().err


def _hashed_copy(src: Path, folder: Path, prefix: str | None = None) -> Path:
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    dst = folder / f"alexnet-test-{prefix or digest}.pth"
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.slow
def test_download_through_torch_hub_checks_the_hash_and_caches(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    source = _hashed_copy(files / "good.pth", mirror)
    out = tmp_path / "dl.msgpack"
    assert cli.main(["--url", source.as_uri(), "--output", str(out), "--no-progress"]) == 0
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / source.name
    assert cached.exists() and out.exists()
    assert "not torchvision's IMAGENET1K_V1 file" in capsys.readouterr().out
    source.unlink()  # a second run is served from torch hub's cache
    out.unlink()
    assert cli.main(["--url", source.as_uri(), "--output", str(out), "--no-progress"]) == 0
    assert out.exists()


def test_download_with_a_wrong_hash_is_refused(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source = _hashed_copy(files / "good.pth", tmp_path, prefix="deadbeef")
    out = tmp_path / "dl.msgpack"
    assert cli.main(["--url", source.as_uri(), "--output", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "failed its sha256 check" in err and err.count("\n") == 1
    assert not out.exists()
    assert not list((tmp_path / "torch_home" / "hub" / "checkpoints").iterdir())


@pytest.mark.slow
def test_no_network_is_one_clear_line(tmp_path):
    # Port 9 on loopback refuses the connection, as an offline machine would.
    result = _run(
        "--url",
        "http://127.0.0.1:9/alexnet-owt-7be5be79.pth",
        "--no-progress",
        cwd=tmp_path,
        env={"TORCH_HOME": str(tmp_path / "th")},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: could not download http://127.0.0.1:9/alexnet-owt-7be5be79.pth")
    assert "--checkpoint PATH" in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.msgpack"))


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, a folder nobody can create files in (not even root)")
def test_an_unwritable_output_is_refused_before_reading_the_weights(tmp_path, capsys):
    # The checkpoint does not exist: the output's folder is looked at first.
    assert cli.main(["--checkpoint", str(tmp_path / "missing.pth"), "--output", "/sys/o.msgpack"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --output /sys/o.msgpack: folder /sys is not writable (") and err.count("\n") == 1


@pytest.mark.slow  # a conversion of the full model: test_convert keeps the fast loop's conversions
def test_half_precision_weights_are_written_as_float32_unless_asked(files, tmp_path, capsys, torchvision_state_dict):
    torch.save({k: v.half() for k, v in torchvision_state_dict(0).items()}, tmp_path / "half.pth")
    assert cli.main(["--checkpoint", str(tmp_path / "half.pth"), "--output", str(tmp_path / "a.msgpack")]) == 0
    assert "dtype: the source's float16 weights written as float32 (--dtype chooses)" in capsys.readouterr().out
    dtypes = {
        leaf.dtype for module in load_variables(tmp_path / "a.msgpack")["params"].values() for leaf in module.values()
    }
    assert dtypes == {np.dtype(np.float32)}
    # --dtype keeps another on request: the same cast, to the dtype asked for.
    variables = load_variables(tmp_path / "a.msgpack")
    kept, cast = cast_floating(variables, np.float16)
    assert cast == ["float32"] and {leaf.dtype for leaf in jax.tree.leaves(kept)} == {np.dtype(np.float16)}
