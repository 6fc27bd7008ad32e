"""The `alexnet-jax` command: one subcommand per job, each a thin layer over the library.

    alexnet-jax convert --verify          # torchvision's weights, checked against torch, to a .msgpack
    alexnet-jax classify --weights alexnet.msgpack photos/
    alexnet-jax lpips --weights alexnet.msgpack a.png b.png
    alexnet-jax export --weights alexnet.msgpack --format onnx --output alexnet.onnx
    alexnet-jax train --data train/ --val-data val/ --workdir runs/a
    alexnet-jax pack train/ --output train-shards/   # ArrayRecord shards that --data reads

`python -m alexnet_jax` is the same command, and so are the scripts `convert/torch_to_flax.py`
and `examples/{classify,lpips_distance,train}.py` (each its subcommand). `SUBCOMMANDS` is the
name table: each entry a module of this package whose docstring's first line is its line in
`alexnet-jax --help` and whose other lines are its `--help`'s epilog, with

    add_arguments(parser)       its flags
    check(args)                 usage checks after parsing: ValueError -> one line, exit 2
    run(args) -> int            the work; the exit status
    configure_process()         the process-wide settings it makes when it runs as a program

A new subcommand is one more such module and one more line in the table.

Importing this package changes nothing process-wide: `main` makes the chosen subcommand's
settings (`configure_process`), `run` leaves the process as it is (for tests and programs
that embed a subcommand).
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence

from alexnet_jax.cli import classify, convert, export, lpips, pack, train

PROG = "alexnet-jax"
DESCRIPTION = (
    "torchvision's AlexNet and the 2012 paper's in JAX/Flax: convert weights, classify, LPIPS, export, train, pack."
)
SUBCOMMANDS: dict[str, types.ModuleType] = {
    "convert": convert,
    "classify": classify,
    "lpips": lpips,
    "export": export,
    "train": train,
    "pack": pack,
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `alexnet-jax` parser and each subcommand's parser, by name."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=f"'{PROG} COMMAND --help' for a command's flags, examples and exit statuses.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, module in SUBCOMMANDS.items():
        summary, details = module.__doc__.strip().split("\n\n", 1)
        parsers[name] = commands.add_parser(
            name,
            help=summary.rstrip("."),
            description=summary,
            epilog=details,  # examples, outputs, exit statuses
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parsers[name])
    return parser, parsers


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`argv` (default `sys.argv[1:]`) parsed and checked; `args.command` names the subcommand.

    **Raises:** SystemExit(2) with argparse's usage line and one error line for bad arguments.
    """
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    try:
        SUBCOMMANDS[args.command].check(args)
    except ValueError as e:
        parsers[args.command].error(str(e))
    return args


def run(argv: Sequence[str] | None = None) -> int:
    """`alexnet-jax ARGV` in this process, which it leaves as it is; **Returns:** the exit status."""
    args = parse(argv)
    return SUBCOMMANDS[args.command].run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`alexnet-jax ARGV` as a program: the subcommand's process-wide settings, then `run`'s work.

    The `alexnet-jax` entry point, `python -m alexnet_jax` and the scripts call this.
    **Returns:** the exit status (usage errors exit 2 in argparse).
    """
    args = parse(argv)
    SUBCOMMANDS[args.command].configure_process()
    return SUBCOMMANDS[args.command].run(args)
