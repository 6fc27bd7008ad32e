"""Variables files: round trips, atomic writes, loud errors on bad files."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from alexnet_jax import ConversionError, load_variables, save_variables


@pytest.mark.parametrize("name", ["w.msgpack", "w.safetensors", "w.flax"])
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


def test_written_file_follows_the_umask(tmp_path, flax_variables):
    # The temporary file behind the atomic write is created 0600; the result must not stay private.
    umask = os.umask(0o022)
    try:
        path = save_variables(tmp_path / "w.msgpack", flax_variables())
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
