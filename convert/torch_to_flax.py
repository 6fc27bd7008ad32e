#!/usr/bin/env python
"""Convert torch AlexNet weights to an alexnet_jax variables file: `alexnet-jax convert`, as a script.

    python convert/torch_to_flax.py --verify                       # torchvision's IMAGENET1K_V1, via torch hub
    python convert/torch_to_flax.py --checkpoint model.pth --output model.msgpack --verify

The same flags, messages and exit codes as `alexnet-jax convert` (`alexnet_jax.cli.convert`
says them): 0 ok, 1 bad input, unwritable output or unavailable weights, 2 usage, 3 --verify
found a mismatch, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import sys

from alexnet_jax import cli
from alexnet_jax.cli.convert import EXIT_ERROR, EXIT_MISMATCH, EXIT_USAGE

__all__ = ["EXIT_ERROR", "EXIT_MISMATCH", "EXIT_USAGE", "main"]


def main(argv: list[str] | None = None) -> int:
    """`alexnet-jax convert ARGV` in this process, without the program's process-wide settings."""
    return cli.run(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(cli.main(["convert", *sys.argv[1:]]))
