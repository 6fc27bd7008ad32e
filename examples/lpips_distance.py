"""LPIPS distance between two images, or same-named images in two folders: `alexnet-jax lpips`, as a script.

    python examples/lpips_distance.py --weights alexnet.msgpack img0.png img1.png
    python examples/lpips_distance.py --weights alexnet.msgpack --dir0 D0 --dir1 D1 --output results.csv

The same flags, output and exit statuses as `alexnet-jax lpips` (`alexnet_jax.cli.lpips`).
"""

from __future__ import annotations

import argparse
import sys

from alexnet_jax import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of `alexnet-jax lpips`, parsed and checked (SystemExit 2 with one line for bad ones)."""
    return cli.parse(["lpips", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    """`alexnet-jax lpips ARGV` in this process, without the program's process-wide settings."""
    return cli.run(["lpips", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(cli.main(["lpips", *sys.argv[1:]]))
