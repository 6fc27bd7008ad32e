"""Classify image files and folders: reading, batching, per-file errors, CSV/JSON results.

The logic behind `alexnet-jax classify`, importable and tested. A file that cannot
be read never stops a run: it becomes a `FileResult` with a one-line `error`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.archs import Arch, get_arch
from alexnet_jax.files import atomic_write_bytes, check_output_file
from alexnet_jax.inference.predict import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, Prediction, predict
from alexnet_jax.models.variables import variables_architecture
from alexnet_jax.transforms.images import ImageReadError, Walk, load_image, walk_images

RESULT_FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class FileResult:
    """The outcome for one file: a prediction, or the reason there is none."""

    path: Path
    prediction: Prediction | None = None
    error: str | None = None


def find_images(paths: Iterable[str | os.PathLike]) -> Walk:
    """The files to classify, in order: each file given as is, each folder walked by `walk_images`.

    A path that does not exist is kept, so that it is reported as "no such file".
    **Returns:** a `Walk`: files to classify, files skipped in folders for their suffix,
    and one line per folder that could not be listed or link loop not followed.
    """
    walk = Walk()
    for path in map(Path, paths):
        if not path.is_dir():
            walk.images.append(path)
            continue
        found = walk_images(path)
        walk.images += found.images
        walk.other_files += found.other_files
        walk.problems += found.problems
    return walk


def _read(path: Path, exif: bool, arch: Arch) -> np.ndarray:
    try:
        return arch.eval_transform(load_image(path, exif=exif), arch.image_size, 1)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - a decoded image PIL cannot convert or resize
        raise ImageReadError(f"cannot preprocess ({type(e).__name__}: {e})") from None


def classify_files(
    variables: Mapping[str, Any],
    paths: Sequence[Path],
    *,
    k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: Any = jnp.float32,
    exif: bool = False,
) -> Iterator[FileResult]:
    """Classify `paths` in batches, yielding one `FileResult` per path, in order.

    Files are read `batch_size` at a time and only their model inputs are kept (224x224
    for torchvision's AlexNet, 227x227 for `AlexNet2012`, whichever `variables` are
    for), so memory stays flat however many files there are. Unreadable files yield a
    result with `error` set and do not take a place in the batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    arch = get_arch(variables_architecture(variables))
    # Once here, not per chunk: host arrays would be copied to the device again at every call.
    variables = jax.device_put(variables)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        inputs: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                inputs[i] = _read(path, exif, arch)
            except ImageReadError as e:
                errors[i] = str(e)
        batch = list(inputs.values())
        predictions = iter(
            predict(variables, np.stack(batch), k=k, batch_size=batch_size, dtype=dtype, arch=arch.name)
            if batch
            else []
        )
        for i, path in enumerate(chunk):
            yield FileResult(path, error=errors[i]) if i in errors else FileResult(path, prediction=next(predictions))


def check_output_path(path: str | os.PathLike) -> Path:
    """Check before a run that results can be written to `path` (a file is created and removed in its folder).

    **Raises:** ValueError saying why not.
    """
    path = Path(path)
    if path.suffix.lower() not in RESULT_FORMATS:
        raise ValueError(
            f"{path}: results are written as {' or '.join(RESULT_FORMATS)}; got suffix {path.suffix or '(none)'!r}"
        )
    return check_output_file(path)


def _rows(results: Iterable[FileResult]) -> list[dict[str, Any]]:
    return [
        {
            "path": str(r.path),
            "predictions": [
                {"index": i, "label": label, "probability": p}
                for i, label, p in zip(r.prediction.indices, r.prediction.labels, r.prediction.probabilities)
            ]
            if r.prediction
            else [],
            "error": r.error,
        }
        for r in results
    ]


def _csv_text(rows: list[dict[str, Any]], k: int) -> str:
    columns = (
        ["path"]
        + [f"top{j}_{field}" for j in range(1, k + 1) for field in ("index", "label", "probability")]
        + ["error"]
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {"path": row["path"], "error": row["error"] or ""}
        for j, entry in enumerate(row["predictions"], start=1):
            flat.update({f"top{j}_{field}": entry[field] for field in ("index", "label", "probability")})
        writer.writerow(flat)
    return buffer.getvalue()


def write_results(path: str | os.PathLike, results: Sequence[FileResult]) -> Path:
    """Write results atomically: `.csv` one row per file, or `.json` a list of records.

    A CSV row holds the path, the top-k index/label/probability and the error.

    **Returns:** the path written. **Raises:** ValueError for another suffix or a missing folder.
    """
    path = check_output_path(path)
    rows = _rows(results)
    if path.suffix.lower() == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        k = max((len(row["predictions"]) for row in rows), default=0)
        text = _csv_text(rows, k)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def format_result(result: FileResult) -> str:
    """One line for a person: `path: label p; label p; ...` or `path: reason`."""
    return f"{result.path}: {result.prediction if result.prediction else result.error}"


def summarize(results: Sequence[FileResult], skipped: Sequence[Path] = ()) -> str:
    """One line: how many files were classified, unreadable, and skipped for their suffix."""
    failed = sum(r.error is not None for r in results)
    text = f"classified {len(results) - failed} of {len(results)} files, {failed} unreadable"
    if skipped:
        text += f", {len(skipped)} skipped (not an image suffix)"
    return text
