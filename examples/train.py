"""Train or fine-tune AlexNet on an ImageFolder tree (root/<class>/<image>): `alexnet-jax train`, as a script.

    python examples/train.py --data train/ --val-data val/ --workdir runs/a
    python examples/train.py --data train/ --val-data val/ --workdir runs/a --resume
    python examples/train.py ... --parallel sharded \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # and 1 on the other host

The same flags, messages and exit statuses as `alexnet-jax train` (`alexnet_jax.cli.train`
says them; its flags are `alexnet_jax.TrainConfig`'s fields): 0 trained, 1 a failure in one
line, 2 bad arguments, 143/130 stopped by SIGTERM/SIGINT after saving (--resume continues).
Needs the `train` extra.
"""

from __future__ import annotations

import sys

from alexnet_jax import cli


def main(argv: list[str] | None = None) -> int:
    """`alexnet-jax train ARGV` in this process, without the program's process-wide settings."""
    return cli.run(["train", *(sys.argv[1:] if argv is None else argv)])


# Grain's data workers spawn: they import this file again, and must not start a run.
if __name__ == "__main__":
    sys.exit(cli.main(["train", *sys.argv[1:]]))
