"""Variables files: round trips, atomic writes (and what killed or full-disk writes leave), loud errors."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from alexnet_jax import ConversionError, load_variables, save_variables
from alexnet_jax.files import _host, atomic_write_bytes, check_writable_folder

from helpers import run_python, slow_after


@pytest.mark.parametrize("name", slow_after(1, ["w.msgpack", "w.safetensors", "w.flax"]))
def test_round_trip_is_bit_exact(tmp_path, flax_variables, name):
    variables = flax_variables()
    path = save_variables(tmp_path / name, variables)
    loaded = load_variables(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), variables, loaded)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_failed_write_leaves_the_old_file_untouched(tmp_path, flax_variables, monkeypatch):
    target = tmp_path / "w.msgpack"
    target.write_bytes(b"old contents")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_variables(target, flax_variables())
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["w.msgpack"]


def test_wrong_tree_never_reaches_the_disk(tmp_path, flax_variables):
    params = dict(flax_variables()["params"])
    del params["classifier_6"]
    with pytest.raises(ConversionError, match="missing 2: classifier_6/kernel, classifier_6/bias"):
        save_variables(tmp_path / "w.msgpack", {"params": params})
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # the fast loop keeps the round trip and the full-disk message
@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, flax_variables, suffix):
    path = save_variables(tmp_path / f"w{suffix}", flax_variables())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=f"w{suffix}: truncated or corrupt"):
        load_variables(path)


def test_other_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.msgpack: no such file"):
        load_variables(tmp_path / "nope.msgpack")
    from flax import serialization

    other = tmp_path / "other.msgpack"
    other.write_bytes(serialization.msgpack_serialize({"params": {"dense": {"kernel": np.zeros((3, 4))}}}))
    with pytest.raises(ValueError, match="other.msgpack: variable tree is not torchvision's AlexNet: missing 16"):
        load_variables(other)
    no_params = tmp_path / "np.msgpack"
    no_params.write_bytes(serialization.msgpack_serialize({"weights": np.zeros(3)}))
    with pytest.raises(ValueError, match="no 'params' at the top"):
        load_variables(no_params)


@pytest.mark.slow
def test_written_file_follows_the_umask(tmp_path, flax_variables):
    # The temporary file behind the atomic write is created 0600; the result must not stay private.
    umask = os.umask(0o022)
    try:
        path = save_variables(tmp_path / "w.msgpack", flax_variables())
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_loaded_variables_are_on_the_device_unless_asked(tmp_path, flax_variables):
    path = save_variables(tmp_path / "w.msgpack", flax_variables())
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(load_variables(path)))
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(load_variables(path, device=False)))


def test_load_model_builds_the_network_of_our_file(tmp_path, flax_variables):
    """The fast loop's load_model: a file of ours to (AlexNet, device arrays); every other source is the next test's."""
    from alexnet_jax import AlexNet, load_model

    want = flax_variables()
    model, variables = load_model(save_variables(tmp_path / "w.msgpack", want), conv_algorithm="winograd")
    assert model == AlexNet(num_classes=1000, conv_algorithm="winograd")
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), want)


@pytest.mark.slow
@pytest.mark.torch
def test_load_model_from_every_kind_of_source(tmp_path, torchvision_state_dict, monkeypatch):
    import hashlib

    import jax.numpy as jnp
    import torch
    from safetensors.torch import save_file

    from alexnet_jax import load_model, torch_to_flax
    from alexnet_jax.weights.torchvision import WeightsRecord

    state_dict = torchvision_state_dict(0, 10)
    want = torch_to_flax(state_dict)
    pth = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, pth)
    torch_safetensors = tmp_path / "torch.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, torch_safetensors)
    ours = save_variables(tmp_path / "ours.safetensors", want)
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()[:8]
    mirror = tmp_path / f"alexnet-test-{digest}.pth"
    mirror.write_bytes(pth.read_bytes())
    record = WeightsRecord("TEST", mirror.as_uri(), digest, 0, 63, 0.0, 0.0, num_classes=10)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    x = jnp.zeros((1, 63, 63, 3))
    for source in (pth, torch_safetensors, ours, save_variables(tmp_path / "w.msgpack", want), str(pth), record):
        model, variables = load_model(source, progress=False)
        assert model.num_classes == 10, source
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), want)
        assert model.apply(variables, x).shape == (1, 10)
    model, _ = load_model(ours, dtype=jnp.bfloat16, conv_algorithm="winograd", dropout_rate=0.1)
    assert (model.dtype, model.conv_algorithm, model.dropout_rate) == (jnp.bfloat16, "winograd", 0.1)


@pytest.mark.slow
@pytest.mark.torch
def test_load_model_builds_the_2012_network_for_its_weights(tmp_path):
    import jax.numpy as jnp

    from alexnet_jax import AlexNet2012, flax_to_torch, load_model

    want = jax.device_get(jax.jit(AlexNet2012(num_classes=5).init)(jax.random.key(0), jnp.zeros((1, 227, 227, 3))))
    for path in (save_variables(tmp_path / "paper.msgpack", want), tmp_path / "paper.pth"):
        if path.suffix == ".pth":
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in flax_to_torch(want).items()}, path)
        model, variables = load_model(path)
        assert isinstance(model, AlexNet2012) and model.num_classes == 5, path
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), want)
    with pytest.raises(ValueError, match="XLA's convolution only"):
        load_model(tmp_path / "paper.msgpack", conv_algorithm="winograd")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "missing.msgpack")


@pytest.mark.slow
def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    """SIGKILL mid-write cannot be cleaned up by the writer; the next write to the same file removes what it left,
    but never a temporary file whose writer still runs."""
    killed = run_python(
        [
            "-c",
            "import os, signal, sys\nfrom pathlib import Path\nfrom alexnet_jax.files import _create_temporary\n"
            "fd, tmp = _create_temporary(Path(sys.argv[1]), 'final.msgpack')\nos.write(fd, b'half of it')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
            tmp_path,
        ]
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".final.msgpack.") and left.name.endswith(".tmp")
    live = tmp_path / f".final.msgpack.{_host()}.{os.getpid()}.0123abcd.tmp"  # this process: alive
    live.write_bytes(b"being written")
    atomic_write_bytes(tmp_path / "final.msgpack", b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "final.msgpack"]


def test_a_full_disk_names_the_file_and_the_space_needed(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError, match=r"w.bin: No space left on device; writing it needs about 2\.5 MB, .* MB free"
    ) as e:
        atomic_write_bytes(tmp_path / "w.bin", bytes(2_500_000))
    assert e.value.errno == errno.ENOSPC and str(e.value).count("\n") == 0
    assert os.listdir(tmp_path) == []


def test_check_writable_folder(tmp_path):
    assert check_writable_folder(tmp_path / "new" / "run", "workdir") == tmp_path / "new" / "run"
    assert os.listdir(tmp_path / "new" / "run") == []  # the probe file is gone
    if Path("/sys").is_dir():  # not writable even for root
        with pytest.raises(OSError, match=r"^workdir /sys/run is not writable \("):
            check_writable_folder("/sys/run", "workdir")
