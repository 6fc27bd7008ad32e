"""Write AlexNet, its trunk or LPIPS as a jax.export or ONNX file.

    alexnet-jax export --weights alexnet.msgpack --format onnx --output alexnet.onnx
    alexnet-jax export --weights alexnet.msgpack --format stablehlo --output alexnet.jax_exported \
        --platforms cpu,cuda
    alexnet-jax export --weights alexnet.msgpack --format stablehlo --model lpips --output lpips.jax_exported

--weights is any file `load_model` reads (a variables file, or torchvision's .pth). The
batch is dynamic, and so are height and width unless --size fixes them (sides of at least
63 for the classifier, 31 for the trunk and LPIPS). --model trunk outputs the conv ReLUs
(--layers); lpips is stablehlo only. How to run each artifact: docs/export.md. Exit status:
0 when the file was written; 1 when the weights could not be read or the export could not
be made or written; 2 for bad arguments. The work is in `alexnet_jax.export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alexnet_jax import lpips
from alexnet_jax.export.artifact import FORMATS, check_request, export_file, require_format
from alexnet_jax.export.stablehlo import PLATFORMS, TARGETS, min_size
from alexnet_jax.files import check_output_file
from alexnet_jax.host_memory import keep_freed_memory
from alexnet_jax.models.alexnet import TRUNK_LAYERS
from alexnet_jax.weights.pretrained import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", required=True, help="variables file from alexnet-jax convert, or a torchvision .pth"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="stablehlo (jax.export) or onnx")
    parser.add_argument("--output", required=True, type=Path, help="the file to write")
    parser.add_argument("--model", choices=TARGETS, default="classifier", help="what to export (default %(default)s)")
    parser.add_argument(
        "--platforms",
        default="cpu",
        help=f"stablehlo: comma-separated, some of {','.join(PLATFORMS)} (default %(default)s)",
    )
    parser.add_argument("--size", type=int, help="a fixed height and width instead of dynamic ones")
    parser.add_argument(
        "--layers", default=",".join(TRUNK_LAYERS), help="--model trunk: the ReLUs to output (default %(default)s)"
    )
    parser.add_argument(
        "--lpips-version",
        choices=lpips.VERSIONS,
        default=lpips.DEFAULT_VERSION,
        help="--model lpips (default %(default)s)",
    )
    parser.add_argument(
        "--weights-as-argument",
        action="store_true",
        help="stablehlo: take the weights as the first argument instead of embedding them (a small file)",
    )


def check(args: argparse.Namespace) -> None:
    """**Raises:** ValueError (a usage error) for options the format cannot take, a size too small, or an
    --output that cannot be written."""
    args.platforms = tuple(p for p in args.platforms.split(",") if p)
    args.layers = tuple(name for name in args.layers.split(",") if name)
    unknown = [name for name in args.layers if name not in TRUNK_LAYERS]
    if unknown or not args.layers:
        raise ValueError(f"--layers takes some of {','.join(TRUNK_LAYERS)}, got {','.join(args.layers) or 'none'}")
    bad = [p for p in args.platforms if p not in PLATFORMS]
    if bad or not args.platforms:
        raise ValueError(f"--platforms takes some of {','.join(PLATFORMS)}, got {','.join(args.platforms) or 'none'}")
    check_request(args.format, args.model, args.platforms, not args.weights_as_argument)
    if args.size is not None and args.size < min_size(args.model, args.layers):
        raise ValueError(f"--size: the {args.model} takes sides of at least {min_size(args.model, args.layers)}")
    check_output_file(args.output)


def configure_process() -> None:
    # Before JAX starts its backend: glibc keeps the memory XLA's CPU programs free (host_memory.py).
    keep_freed_memory()


def run(args: argparse.Namespace) -> int:
    try:
        require_format(args.format)  # a missing extra before the weights are read
        _, variables = load_model(args.weights, progress=False)
    except (OSError, ValueError, RuntimeError) as e:  # WeightsError is a RuntimeError; ExportError a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        path = export_file(
            variables,
            args.output,
            args.format,
            args.model,
            platforms=args.platforms,
            size=args.size,
            layers=args.layers,
            lpips_version=args.lpips_version,
            embed_weights=not args.weights_as_argument,
        )
    except (OSError, ValueError) as e:
        print(f"error: could not export to {args.output}: {e}", file=sys.stderr)
        return 1
    shape = "dynamic batch, height and width" if args.size is None else f"dynamic batch, {args.size}x{args.size}"
    print(f"wrote {path} ({args.format}, {args.model}, {shape}, {path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0
