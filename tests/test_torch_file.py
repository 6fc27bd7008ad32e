"""torch's `.pth` files without torch (`weights.torch_file`): bit for bit what `torch.load(weights_only=True)` gives,
and every malicious or corrupt file refused as the converter refuses it with torch, in a process that cannot import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from alexnet_jax.weights.torch_file import TorchFileError, UnsafePickle, read_torch_file, unpickle
from alexnet_jax.weights.torchvision import WeightsError, load_checkpoint

from helpers import run_python


class _Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _numpy(t):
    """A torch tensor as the numpy array the reader gives (bfloat16 as ml_dtypes', by its bits)."""
    import ml_dtypes
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same(got, want):
    """The reader's object is torch.load's, tensors as numpy arrays equal to the bit, in dtype and shape."""
    import torch

    if isinstance(want, torch.Tensor):
        want = _numpy(want)
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.c_contiguous
        bits = (a.reshape(-1).view(np.uint8) for a in (got, np.ascontiguousarray(want)))
        np.testing.assert_array_equal(*bits)
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    else:
        assert got == want and type(got) is type(want)


@pytest.fixture(scope="module")
def files(tmp_path_factory, torchvision_state_dict):
    """torch files of every kind the reader meets; all small but the full state_dict, which `good_pth` writes."""
    import torch

    d = tmp_path_factory.mktemp("torch_files")
    sd = torchvision_state_dict(0)
    torch.save({k: v.half() for k, v in sd.items() if k.startswith("features.")}, d / "half.pth")
    trainer = {"epoch": 7, "lr": 0.01, "model": {f"module.{k}": v for k, v in sd.items() if "features" in k}}
    torch.save(trainer, d / "trainer.pt")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    odd = {
        "transposed": base.t(),  # non-contiguous
        "sliced": base[1:5:2, 3:],  # an offset into the storage, two strides
        "whole": base,  # the same storage as the two above
        "bf16": base.to(torch.bfloat16)[::3],
        "int": torch.tensor([1, -2, 3], dtype=torch.int64),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "param": torch.nn.Parameter(torch.ones(3)),
        "size": torch.Size([2, 3]),
        "nested": [1, 2.5, "x", None, True, (3, 4)],
    }
    torch.save(odd, d / "odd.pt")
    data = (d / "half.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"epoch": 3, "lr": 0.1}, d / "not_a_state_dict.pth")
    marker = d / "PWNED"
    torch.save({"features.0.weight": _Evil(marker)}, d / "malicious.pth")
    with open(d / "malicious_raw.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    torch.save({"features.0.bias": sd["features.0.bias"]}, d / "legacy.pth", _use_new_zipfile_serialization=False)
    return d


@pytest.fixture(scope="module")
def good_pth(files, torchvision_state_dict):
    """torchvision's whole state_dict (seed 0) as torch.save writes it: 244 MB."""
    import torch

    torch.save(torchvision_state_dict(0), files / "good.pth")
    return files / "good.pth"


@pytest.mark.torch
@pytest.mark.parametrize("name", ["half.pth", "trainer.pt", "odd.pt"])
def test_bit_exact_against_torch_load(files, name):
    import torch

    _assert_same(read_torch_file(files / name), torch.load(files / name, weights_only=True))


@pytest.mark.slow
@pytest.mark.torch
def test_torchvisions_whole_state_dict_is_bit_exact(good_pth):
    import torch

    _assert_same(read_torch_file(good_pth), torch.load(good_pth, weights_only=True))


@pytest.mark.torch
def test_shared_storages_are_read_once_and_each_tensor_is_its_own(files):
    got = read_torch_file(files / "odd.pt")
    assert not np.shares_memory(got["transposed"], got["whole"])
    got["whole"][0, 0] = -1  # its own copy: the others keep their values
    assert got["transposed"][0, 0] == 0


def _evil_archive(tmp_path: Path, pickled: bytes, storage: bytes = b"") -> Path:
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/data/0", storage)
    return path


def test_crafted_archives_are_refused_before_anything_runs(tmp_path):
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    # A view past its storage's end (4 floats, asked for 3x3): refused, never read out of bounds.
    overrun = rebuild + b"(" + storage + b"K\x00K\x03K\x03\x86K\x03K\x01\x86\x89NtR."
    with pytest.raises(TorchFileError, match="reaches element 8 of a storage of 4"):
        read_torch_file(_evil_archive(tmp_path, overrun, np.zeros(4, np.float32).tobytes()))
    with pytest.raises(TorchFileError, match="16 bytes for 5 elements"):
        read_torch_file(_evil_archive(tmp_path, overrun.replace(b"cpuK\x04", b"cpuK\x05"), bytes(16)))
    # Names outside the set, by either opcode, and instructions a state_dict does not use.
    with pytest.raises(UnsafePickle, match=r"asks to run code \(builtins.eval\)"):
        unpickle(b"cbuiltins\neval\n(X\x01\x00\x00\x001tR.", None)
    with pytest.raises(UnsafePickle, match=r"asks to run code \(os.system\)"):
        unpickle(b"\x80\x04\x8c\x02os\x8c\x06system\x93.", None)
    with pytest.raises(TorchFileError, match=r"an instruction a state_dict does not use \(INST\)"):
        unpickle(b"(ios\nsystem\n.", None)
    with pytest.raises(TorchFileError, match="not a tensor or dict rebuild"):
        unpickle(b"ctorch\nFloatStorage\n)R.", None)


# What the converter said with torch for each bad file; without torch it must say the same.
REFUSALS = {
    "truncated.pth": "truncated or corrupt",
    "garbage.pth": "refused: corrupt, or a pickle with instructions that",
    "not_a_state_dict.pth": "not a state_dict: found a dict without tensors under 'state_dict' or 'model'",
    "malicious.pth": "refused: the file asks to run code (posix.system); it was not executed",
    # A bare pickle (protocol 4): torch stops at its FRAME opcode, this reader at the name it asks for.
    "malicious_raw.pkl": "refused: ",
}

# Runs with torch unimportable: each file through load_checkpoint, the messages as JSON.
_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # `import torch` raises ImportError
from alexnet_jax.weights.torchvision import WeightsError, load_checkpoint
out = {}
for path in sys.argv[1:]:
    try:
        sd = load_checkpoint(path)
        out[path] = {"keys": len(sd)}
    except WeightsError as e:
        out[path] = {"error": str(e)}
assert "torch" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print(json.dumps(out))
"""


@pytest.mark.torch
def test_bad_files_are_refused_the_same_way_without_torch(files):
    names = [*REFUSALS, "legacy.pth", "half.pth"]
    run = run_python(["-c", _WITHOUT_TORCH, *(files / name for name in names)])
    assert run.returncode == 0, run.stderr
    without = {Path(k).name: v for k, v in json.loads(run.stdout).items()}
    for name, message in REFUSALS.items():
        with pytest.raises(WeightsError) as with_torch:
            load_checkpoint(files / name)
        for text in (str(with_torch.value), without[name]["error"]):
            assert text.startswith(f"{files / name}: ") and message in text and "\n" not in text, text
    assert "asks to run code (posix.system); it was not executed" in without["malicious_raw.pkl"]["error"]
    assert "legacy format (before torch 1.6) needs torch" in without["legacy.pth"]["error"]
    assert len(load_checkpoint(files / "legacy.pth")) == 1  # with torch, torch reads it
    assert without["half.pth"] == {"keys": 10}
    assert not (files / "PWNED").exists()


# With torch unimportable: --verify refused first (one line on stderr, nothing done), then the
# hash-checked download into torch hub's cache, load_model() from that cache, and the conversion.
_CONVERT_WITHOUT_TORCH = """
import shutil, sys
sys.modules["torch"] = None
from alexnet_jax import cli, load_model
from alexnet_jax.weights.torchvision import IMAGENET1K_V1, fetch_state_dict
url, out, refused = sys.argv[1:]
assert cli.run(["convert", "--url", url, "--output", refused, "--verify", "--no-progress"]) == 1
state_dict, cached = fetch_state_dict(url, progress=False)
print(len(state_dict), cached)
# load_model()'s default reads IMAGENET1K_V1 from the same cache: these weights stand in for it.
shutil.copy(cached, cached.with_name(IMAGENET1K_V1.file_name))
model, variables = load_model(progress=False)
assert type(model).__name__ == "AlexNet" and variables["params"]["classifier_6"]["bias"].shape == (1000,)
sys.exit(cli.run(["convert", "--checkpoint", str(cached), "--output", out, "--no-progress"]))
"""


@pytest.mark.slow
@pytest.mark.torch
def test_download_load_model_and_convert_work_without_torch_and_verify_says_it_needs_it(good_pth, tmp_path):
    import torch

    from alexnet_jax import load_variables, torch_to_flax

    data = good_pth.read_bytes()
    named = tmp_path / f"alexnet-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torch hub's rule: the hash in the name
    named.write_bytes(data)
    out, refused = tmp_path / "alexnet.msgpack", tmp_path / "refused.msgpack"
    env = {"TORCH_HOME": str(tmp_path / "torch_home")}
    run = run_python(["-c", _CONVERT_WITHOUT_TORCH, named.as_uri(), out, refused], env=env, drop_env=["XDG_CACHE_HOME"])
    assert run.returncode == 0, run.stderr
    verify_line = "error: --verify (torch's AlexNet on sample photos) needs torch"
    assert run.stderr.startswith(verify_line) and run.stderr.count("\n") == 1, run.stderr  # and nothing else
    assert not refused.exists()
    assert run.stdout.startswith(f"16 {tmp_path / 'torch_home' / 'hub' / 'checkpoints' / named.name}")
    want = torch_to_flax(torch.load(good_pth, weights_only=True))
    got = load_variables(out, device=False)
    for module, leaves in want["params"].items():
        for leaf, value in leaves.items():
            np.testing.assert_array_equal(got["params"][module][leaf], value)
    assert sys.modules.get("torch") is not None  # this process was never the one without torch
