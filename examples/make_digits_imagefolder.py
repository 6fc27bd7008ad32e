"""Write scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an ImageFolder.

    python examples/make_digits_imagefolder.py --output digits --size 64

Creates OUTPUT/train/<digit>/NNNN.png and OUTPUT/val/<digit>/NNNN.png: a stratified
split (default 20% validation, fixed by --seed), each image scaled from 8x8 to
SIZE x SIZE (bilinear) as 8-bit grayscale, white digits on black as in the data set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(output: Path, *, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the split; **returns** the number of images per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = round(len(indices) * val_fraction)
        for split, part in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = output / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # values are 0..16
                Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
                counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder to create (train/ and val/ inside)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="fixes the split (default %(default)s)")
    args = parser.parse_args(argv)
    if args.size < 8 or not 0 < args.val_fraction < 1:
        parser.error("--size must be at least 8 and --val-fraction between 0 and 1")
    if (args.output / "train").exists() or (args.output / "val").exists():
        print(f"error: {args.output} already holds train/ or val/; choose a new --output", file=sys.stderr)
        return 1
    counts = write_digits(args.output, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
