"""LPIPS distances: two images, or same-named images in two folders.

    alexnet-jax lpips --weights alexnet.msgpack img0.png img1.png
    alexnet-jax lpips --weights alexnet.msgpack --dir0 D0 --dir1 D1 --output results.csv

The distance is lpips's (Zhang et al. 2018) on the AlexNet trunk of --weights.
Images are read as lpips's scripts read them (8-bit RGB to [-1, 1]; see
`alexnet_jax.lpips.read_image`); the two images of a pair must have one size, at
least 31x31. For two files the distance alone goes to stdout. For two folders each
pair gets a line `name: distance` on stdout; pairs that cannot be compared (an
unreadable file, two sizes) get a line with the reason on stderr and are skipped, as
are files found in one folder only. Exit status: 0 when the named pair, or at least
one pair of the folders, was compared; 1 when a named file could not be used, no pair
was compared, or the weights or the output could not be read or written; 2 for bad
arguments. The work is in `alexnet_jax.lpips`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
from tqdm import tqdm

from alexnet_jax import lpips
from alexnet_jax.host_memory import keep_freed_memory
from alexnet_jax.inference.predict import DEFAULT_BATCH_SIZE
from alexnet_jax.weights.serialization import load_variables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path, help="AlexNet variables file from alexnet-jax convert")
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="two image files (IMG0 IMG1)")
    parser.add_argument("--dir0", type=Path, help="folder of images, compared with the same names in --dir1")
    parser.add_argument("--dir1", type=Path, help="the other folder")
    parser.add_argument("--output", type=Path, help="also write path0, path1, distance, error per pair to this .csv")
    parser.add_argument(
        "--version",
        choices=lpips.VERSIONS,
        default=lpips.DEFAULT_VERSION,
        help="lpips's linear weights (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs per call (default %(default)s)"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="run the AlexNet trunk in bfloat16 (float32 normalization and weighting)"
    )


def check(args: argparse.Namespace) -> None:
    """**Raises:** ValueError (a usage error) unless two files or two folders are named, for a batch below 1,
    or an --output that cannot be written."""
    folders = args.dir0 is not None or args.dir1 is not None
    if folders and (args.dir0 is None or args.dir1 is None):
        raise ValueError("--dir0 and --dir1 go together")
    if folders == bool(args.images):
        raise ValueError("give two image files, or --dir0 and --dir1, not both")
    if not folders and len(args.images) != 2:
        raise ValueError(f"give exactly two image files, got {len(args.images)}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.output is not None:
        lpips.check_output_path(args.output)


def configure_process() -> None:
    # Before JAX starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()


def run(args: argparse.Namespace) -> int:
    try:
        params = lpips.load(load_variables(args.weights), args.version)
        if args.images:
            pairs, alone = [tuple(args.images)], []
        else:
            pairs, alone = lpips.find_pairs(args.dir0, args.dir1)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in alone:
        print(f"{path}: skipped, no file of that name in the other folder", file=sys.stderr)
    stream = lpips.distance_files(
        params, pairs, batch_size=args.batch_size, dtype=jnp.bfloat16 if args.bf16 else jnp.float32
    )
    results = []
    # disable=None: a bar on a terminal only, never in logs or pipes.
    for result in tqdm(stream, total=len(pairs), unit="pair", disable=None if len(pairs) > 1 else True):
        results.append(result)
        if args.images:
            line = f"error: {result.error}" if result.error else f"{result.distance:.7g}"
        else:
            line = lpips.format_result(result) + (", skipped" if result.error else "")
        tqdm.write(line, file=sys.stderr if result.error else sys.stdout)
    if args.output is not None:
        try:
            lpips.write_results(args.output, results)
        except (OSError, ValueError) as e:
            print(f"error: could not write {args.output}: {e}", file=sys.stderr)
            return 1
    compared = sum(r.error is None for r in results)
    if not args.images:
        summary = f"compared {compared} of {len(pairs)} pairs, {len(pairs) - compared} skipped"
        summary += f", {len(alone)} unpaired (in one folder only)" if alone else ""
        print(summary + (f"; results in {args.output}" if args.output else ""), file=sys.stderr)
    return 0 if compared else 1
