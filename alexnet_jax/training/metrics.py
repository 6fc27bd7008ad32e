"""A run's metrics: metrics.jsonl (one line per evaluation) and curves.png drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from alexnet_jax.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def truncate_metrics(path: Path, step: int) -> None:
    # Lines written after the checkpoint we resume from would be written again: drop them,
    # and a last line torn by a kill mid-append (it was never followed by a checkpoint).
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if (_metrics_step(line) or math.inf) <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())  # a kill here keeps the old file


def _metrics_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl file, as dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss (train and val) and val top-1/top-5 per epoch from metrics.jsonl, as a two-panel PNG."""
    # A Figure with the Agg canvas, not pyplot: no global backend is chosen or changed
    # (training machines have no display, and the caller may use another backend).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    left.plot(epochs, [r["val_loss"] for r in rows], "o-", label="val")
    left.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    right.plot(epochs, [r["val_top1"] for r in rows], "o-", label="val top-1")
    right.plot(epochs, [r["val_top5"] for r in rows], "o-", label="val top-5")
    right.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="validation accuracy")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return Path(png_path)
