"""Top-5 ImageNet labels for image files and folders.

    alexnet-jax classify --weights alexnet.msgpack cat.jpg
    alexnet-jax classify --weights alexnet.msgpack photos/ --output results.csv

Predictions go to stdout, one line per image; unreadable files, the progress bar
and the summary go to stderr. Exit status: 0 when every image named on the
command line was classified (unreadable files found inside folders are reported,
not fatal), 1 when a named file could not be read, nothing was classified, or the
weights could not be loaded, 2 for bad arguments. The work is in `alexnet_jax.inference.classify`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
from tqdm import tqdm

from alexnet_jax.host_memory import keep_freed_memory
from alexnet_jax.inference.classify import (
    check_output_path,
    classify_files,
    find_images,
    format_result,
    summarize,
    write_results,
)
from alexnet_jax.inference.predict import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K
from alexnet_jax.weights.serialization import load_variables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path, help="variables file from alexnet-jax convert")
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files and folders (walked recursively)"
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="labels per image (default %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass (default %(default)s)"
    )
    parser.add_argument("--output", type=Path, help="also write the results to this .csv or .json file")
    parser.add_argument(
        "--exif", action="store_true", help="rotate images by their EXIF orientation (torchvision does not)"
    )
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16 (parameters stay float32)")


def check(args: argparse.Namespace) -> None:
    """**Raises:** ValueError (a usage error) for a count below 1 or an --output that cannot be written."""
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be at least 1")
    if args.output is not None:
        check_output_path(args.output)


def configure_process() -> None:
    # Before JAX starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()


def run(args: argparse.Namespace) -> int:
    try:
        variables = load_variables(args.weights)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    walk = find_images(args.paths)
    files, skipped = walk.images, walk.other_files
    for problem in walk.problems:
        print(f"warning: {problem}", file=sys.stderr)
    named = {path for path in args.paths if not path.is_dir()}
    results = []
    stream = classify_files(
        variables,
        files,
        k=args.top_k,
        batch_size=args.batch_size,
        dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
        exif=args.exif,
    )
    # disable=None: a bar on a terminal only, never in logs or pipes.
    for result in tqdm(stream, total=len(files), unit="image", disable=None if len(files) > 1 else True):
        results.append(result)
        tqdm.write(format_result(result), file=sys.stderr if result.error else sys.stdout)
    if args.output is not None:
        try:
            write_results(args.output, results)
        except (OSError, ValueError) as e:
            print(f"error: could not write {args.output}: {e}", file=sys.stderr)
            return 1
    print(summarize(results, skipped) + (f"; results in {args.output}" if args.output else ""), file=sys.stderr)
    named_failed = any(r.error and r.path in named for r in results)
    return 1 if named_failed or not any(r.prediction for r in results) else 0
