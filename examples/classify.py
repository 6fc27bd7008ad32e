"""Top-5 ImageNet labels for image files and folders: `alexnet-jax classify`, as a script.

    python examples/classify.py --weights alexnet.msgpack cat.jpg
    python examples/classify.py --weights alexnet.msgpack photos/ --output results.csv

The same flags, output and exit statuses as `alexnet-jax classify` (`alexnet_jax.cli.classify`).
"""

from __future__ import annotations

import sys

from alexnet_jax import cli


def main(argv: list[str] | None = None) -> int:
    """`alexnet-jax classify ARGV` in this process, without the program's process-wide settings."""
    return cli.run(["classify", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(cli.main(["classify", *sys.argv[1:]]))
