"""Command-line flags made from a dataclass's fields, and the dataclass made back from the parsed flags.

    add_dataclass_flags(parser, TrainConfig)     # --data, --val-data, --epochs, ...
    config = dataclass_from_flags(TrainConfig, parser.parse_args(argv))

Each field says what its flag needs in `metadata` (`training.config._setting` writes it):
"help" (required), "choices" (a fixed set), "cli_default" (where the command's default
differs from the library's). The rest comes from the field: `--name-with-dashes`, the
type from the annotation (`int | None` takes an int; None is the flag left out), a bool
as `--name/--no-name`, a field without a default as a required flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_TYPES = (bool, int, float, str)


def flag_name(field: dataclasses.Field) -> str:
    """`--batch-size` for the field `batch_size`."""
    return "--" + field.name.replace("_", "-")


def _flag_type(cls: type, field: dataclasses.Field, hint: Any) -> type:
    # `int | None` -> int: None is what a flag left out gives.
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hints = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = hints[0] if len(hints) == 1 else hint
    if hint not in _TYPES:
        raise TypeError(
            f"{cls.__name__}.{field.name}: a flag takes {', '.join(t.__name__ for t in _TYPES)}, not {hint}"
        )
    return hint


def add_dataclass_flags(parser: Any, cls: type) -> None:
    """One flag per field of the dataclass `cls`, in field order, its value stored under the field's name.

    `parser` is an `argparse.ArgumentParser` or one of its argument groups.

    **Raises:** TypeError for a field without `metadata["help"]` or of a type a flag cannot take.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{field.name} has no metadata['help'] for its flag")
        kind = _flag_type(cls, field, hints[field.name])
        options: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"]}
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
        if "cli_default" in field.metadata:
            options["default"] = field.metadata["cli_default"]
        elif field.default is not dataclasses.MISSING:
            options["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            options["default"] = field.default_factory()
        else:
            options["required"] = True
        if options.get("default") is not None:  # what a None means, the help says
            options["help"] += " (default %(default)s)"
        parser.add_argument(flag_name(field), **options)


def dataclass_from_flags(cls: type, args: argparse.Namespace) -> Any:
    """The `cls` whose fields are the parsed flags of `add_dataclass_flags` (other attributes of `args` ignored)."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
