"""One-line error messages: what every command of this package prints instead of a traceback."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, for one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].split('. ')[0]}" if text else type(e).__name__
