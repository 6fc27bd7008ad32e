"""Classifying files and folders: the library in `alexnet_jax.inference.classify` and `examples/classify.py` end to end.

The CLI runs in a subprocess (`sys.executable`) on a weights file of seeded
torchvision-init weights; its labels must equal the library's `predict` on the
same images. Bad inputs must give one clear line each and never a traceback.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image

from alexnet_jax import predict, save_variables, torch_to_flax
from alexnet_jax.inference.classify import (
    FileResult,
    check_output_path,
    classify_files,
    find_images,
    format_result,
    summarize,
    write_results,
)
from alexnet_jax.transforms.images import ImageReadError, load_image, walk_images

from helpers import REPO, run_python, slow_after

CLASSIFY = REPO / "examples" / "classify.py"
SAMPLES = REPO / "alexnet_jax" / "assets" / "samples"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path) -> Path:
    """A 180-byte PNG that declares 20000x20000 pixels, over twice Pillow's MAX_IMAGE_PIXELS."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_truncated_jpeg(path: Path) -> Path:
    data = (SAMPLES / "rocket.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def variables(torchvision_state_dict):
    return torch_to_flax(torchvision_state_dict(0))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, variables):
    return save_variables(tmp_path_factory.mktemp("weights") / "alexnet.msgpack", variables)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two good photos, three broken files with image suffixes, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    shutil.copy(SAMPLES / "chelsea.jpg", root / "a_chelsea.jpg")
    shutil.copy(SAMPLES / "coffee.jpg", root / "sub" / "coffee.jpg")
    write_truncated_jpeg(root / "sub" / "truncated.jpg")
    write_bomb_png(root / "bomb.png")
    (root / "notes.jpg").write_text("an HTML error page saved as .jpg")
    (root / "readme.txt").write_text("not an image suffix: skipped")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return run_python([CLASSIFY, *args])


# --- library ---------------------------------------------------------------------------


def test_load_image_reasons(tmp_path, folder):
    cases = {
        tmp_path / "missing.jpg": "no such file",
        folder / "notes.jpg": "not an image (Pillow cannot identify the file)",
        folder / "sub" / "truncated.jpg": "truncated or corrupt image (OSError: image file is truncated",
        folder / "bomb.png": "refused as a possible decompression bomb: Image size (400000000 pixels) exceeds limit",
        folder / "sub": "is a folder, not an image file",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageReadError) as error:
            load_image(path)
        assert str(error.value).startswith(reason), path
        assert "\n" not in str(error.value)


def test_load_image_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert load_image(path).size == (40, 20)  # torchvision's default: stored pixels, orientation ignored
    assert load_image(path, exif=True).size == (20, 40)


def test_find_images(folder, tmp_path):
    missing = tmp_path / "missing.png"
    walk = find_images([folder, missing, folder / "readme.txt"])
    found, skipped = walk.images, walk.other_files
    assert walk.problems == []
    assert found == [
        folder / "a_chelsea.jpg",
        folder / "bomb.png",
        folder / "notes.jpg",
        folder / "sub" / "coffee.jpg",
        folder / "sub" / "truncated.jpg",
        missing,  # kept, to be reported
        folder / "readme.txt",  # named explicitly: tried whatever its suffix
    ]
    assert skipped == [folder / "readme.txt"]


def test_walk_follows_links_without_looping_and_reports_unreadable_folders(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a" / "deep").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(root / "a" / "deep" / "y.png")
    (root / "a" / "deep" / "loop").symlink_to(root / "a")  # a loop: would walk forever
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "z.png")
    (root / "b").symlink_to(elsewhere)  # a plain link to another folder: followed, as torchvision does
    locked = root / "c"
    locked.mkdir()
    Image.new("RGB", (8, 8)).save(locked / "w.png")
    # A folder without read permission (faked: the tests may run as root, who reads anything).
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    walk = walk_images(root)
    assert walk.images == [root / "a" / "x.png", root / "a" / "deep" / "y.png", root / "b" / "z.png"]
    assert len(walk.problems) == 2, walk.problems
    assert "a link back to" in walk.problems[0] and str(root / "a" / "deep" / "loop") in walk.problems[0]
    assert walk.problems[1] == f"{locked}: cannot list the folder (Permission denied)"


@pytest.mark.torch
@pytest.mark.slow  # test_cli_single_image runs classify in the fast loop
def test_classify_files_in_order_with_errors(variables, folder):
    files = find_images([folder]).images
    results = list(classify_files(variables, files, batch_size=2))
    assert [r.path for r in results] == files
    assert [r.error is None for r in results] == [True, False, False, True, False]
    good = [load_image(folder / "a_chelsea.jpg"), load_image(folder / "sub" / "coffee.jpg")]
    expected = predict(variables, good, batch_size=2)
    assert [r.prediction.labels for r in results if r.prediction] == [p.labels for p in expected]
    assert summarize(results, [folder / "readme.txt"]) == (
        "classified 2 of 5 files, 3 unreadable, 1 skipped (not an image suffix)"
    )


@pytest.mark.slow
def test_classify_files_takes_the_2012_networks_input(folder):
    """Variables of the paper's layout are classified at its 227x227 input, as `predict` reads PIL images."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import AlexNet2012

    paper = jax.jit(AlexNet2012(num_classes=4).init)(jax.random.key(1), jnp.zeros((1, 227, 227, 3)))
    files = [folder / "a_chelsea.jpg", folder / "sub" / "coffee.jpg"]
    results = list(classify_files(paper, files, k=2))
    expected = predict(paper, [load_image(f) for f in files], k=2)
    assert [r.prediction.indices for r in results] == [p.indices for p in expected]


@pytest.mark.torch
def test_write_results(tmp_path, variables):
    prediction = predict(variables, [load_image(SAMPLES / "chelsea.jpg")], k=3)[0]
    results = [FileResult(Path("cat.jpg"), prediction=prediction), FileResult(Path("bad.jpg"), error="no such file")]
    with open(write_results(tmp_path / "r.csv", results), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == ["cat.jpg", "bad.jpg"]
    assert [rows[0][f"top{j}_label"] for j in (1, 2, 3)] == list(prediction.labels)
    assert float(rows[0]["top1_probability"]) == prediction.probabilities[0]
    assert rows[1]["error"] == "no such file" and rows[1]["top1_label"] == ""
    records = json.loads(write_results(tmp_path / "r.json", results).read_text())
    assert [entry["label"] for entry in records[0]["predictions"]] == list(prediction.labels)
    assert records[1] == {"path": "bad.jpg", "predictions": [], "error": "no such file"}
    assert format_result(results[1]) == "bad.jpg: no such file"
    assert format_result(results[0]).startswith(f"cat.jpg: {prediction.labels[0]} ")


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "r.JSON") == tmp_path / "r.JSON"
    with pytest.raises(ValueError, match=r"results are written as \.csv or \.json; got suffix '\.txt'"):
        check_output_path(tmp_path / "r.txt")
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "no" / "r.csv")


# --- CLI -------------------------------------------------------------------------------


@pytest.mark.torch
def test_cli_single_image(weights_file, variables):
    done = run_cli("--weights", weights_file, SAMPLES / "chelsea.jpg")
    assert done.returncode == 0, done.stderr
    expected = predict(variables, [load_image(SAMPLES / "chelsea.jpg")])[0]
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{SAMPLES / 'chelsea.jpg'}: ")
    assert [entry.rsplit(" ", 1)[0] for entry in lines[0].split(": ", 1)[1].split("; ")] == list(expected.labels)
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.torch
def test_cli_folder_with_broken_files(weights_file, folder, tmp_path):
    output = tmp_path / "results.json"
    done = run_cli("--weights", weights_file, folder, "--batch-size", "2", "--output", output)
    assert done.returncode == 0, done.stderr  # broken files inside a folder are reported, not fatal
    assert "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) == 2
    for name, reason in [
        ("bomb.png", "decompression bomb"),
        ("notes.jpg", "not an image"),
        ("sub/truncated.jpg", "truncated or corrupt image"),
    ]:
        assert f"{folder / name}: " in done.stderr and reason in done.stderr, name
    assert "classified 2 of 5 files, 3 unreadable, 1 skipped (not an image suffix)" in done.stderr
    records = json.loads(output.read_text())
    assert [Path(r["path"]).name for r in records if r["error"] is None] == ["a_chelsea.jpg", "coffee.jpg"]


@pytest.mark.parametrize("name", slow_after(0, ["sub/truncated.jpg", "notes.jpg", "bomb.png", "missing.jpg"]))
@pytest.mark.torch
def test_cli_bad_single_file_fails_cleanly(weights_file, folder, name):
    done = run_cli("--weights", weights_file, folder / name)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"{folder / name}: ")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.torch
def test_cli_bad_arguments(weights_file, tmp_path):
    done = run_cli("--weights", tmp_path / "missing.msgpack", SAMPLES / "chelsea.jpg")
    assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path / 'missing.msgpack'}: no such file"
    done = run_cli("--weights", weights_file, SAMPLES / "chelsea.jpg", "--output", tmp_path / "r.txt")
    assert done.returncode == 2 and "results are written as .csv or .json" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, a folder nobody can create files in (not even root)")
@pytest.mark.torch
@pytest.mark.slow
def test_an_unwritable_output_is_refused_before_any_image_is_classified(weights_file):
    with pytest.raises(ValueError, match=r"/sys/r\.csv: folder /sys is not writable \("):
        check_output_path(Path("/sys/r.csv"))
    done = run_cli("--weights", weights_file, SAMPLES / "chelsea.jpg", "--output", "/sys/r.csv")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert "folder /sys is not writable" in done.stderr and "Traceback" not in done.stderr
