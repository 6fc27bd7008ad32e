"""Pack an ImageFolder into ArrayRecord shards that --data reads.

    alexnet-jax pack train/ --output train-shards/
    alexnet-jax pack train/ --output train-512/ --max-side 512      # re-encoded once, as FFCV stores ImageNet
    alexnet-jax pack train/ --output train-2012/ --arch 2012        # the paper's 256x256 images
    alexnet-jax train --data train-shards/ --val-data val-shards/ ...

Each image is stored with its label and the class names, in the folder's order: a run on
the shards reads the batches a run on the folder reads (the same pixels when nothing is
re-encoded). Files that cannot be read are skipped with a warning and counted. An
interrupted pack removes what it wrote. Exit status: 0 when packed; 1 when the folder,
the output or the writing failed, or the pack was interrupted; 2 for bad arguments. The
work is in `alexnet_jax.training.pack`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alexnet_jax.archs import ARCHS

TRAIN_EXTRA = "pack needs the train extra: pip install 'alexnet-jax[train]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="SRC_FOLDER", help="an ImageFolder: SRC_FOLDER/<class>/<image>")
    parser.add_argument("--output", required=True, type=Path, help="a new or empty folder for the shards")
    parser.add_argument(
        "--max-side", type=int, help="re-encode images whose longer side is larger to this side (JPEG, once)"
    )
    parser.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        help="2012: store the paper's 256x256 images (shorter side to 256, centre crop), re-encoded once",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    parser.add_argument("--shard-mb", type=int, default=256, help="close a shard at this size (default 256 MB)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that read and encode (default: one per core; 0 reads in this process)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check(args: argparse.Namespace) -> None:
    """**Raises:** ValueError (a usage error) for numbers out of range or --max-side with --arch 2012."""
    if args.max_side is not None and args.max_side < 1:
        raise ValueError(f"--max-side must be at least 1, got {args.max_side}")
    if args.max_side is not None and args.arch == "2012":
        raise ValueError("--arch 2012 stores 256x256 images; --max-side does not apply")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be 1 to 100, got {args.quality}")
    if args.shard_mb < 1:
        raise ValueError(f"--shard-mb must be at least 1, got {args.shard_mb}")
    if args.workers < 0:
        raise ValueError(f"--workers must be at least 0, got {args.workers}")


def configure_process() -> None:
    pass


def run(args: argparse.Namespace) -> int:
    try:
        from alexnet_jax.training.pack import pack_folder
    except ImportError as e:  # array_record (with Grain) missing: one line, not a traceback
        print(f"error: {e}; {TRAIN_EXTRA}", file=sys.stderr)
        return 1
    try:
        result = pack_folder(
            args.source,
            args.output,
            max_side=args.max_side,
            square=args.arch == "2012",
            quality=args.quality,
            shard_bytes=args.shard_mb * 2**20,
            workers=args.workers,
            progress=args.progress,
        )
    except KeyboardInterrupt:
        print(f"interrupted: removed the shards written to {args.output}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = f", {result.skipped} unreadable file(s) skipped" if result.skipped else ""
    print(
        f"packed {result.images} images into {result.shards} shard(s) of {result.output} "
        f"({result.bytes / 2**20:.1f} MB){skipped}"
    )
    return 0
