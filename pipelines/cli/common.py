"""What command groups share: argument types and the list of methods for --help."""

from __future__ import annotations

import argparse
import math

from pipelines.options import parse_param
from unlearning.errors import UserError


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_number(text: str) -> float:
    value = number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def fraction(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def key_value(text: str) -> tuple[str, object]:
    """argparse type of `--param KEY=VALUE`."""
    try:
        return parse_param(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


METHODS_HELP = "a registered method (default: ptn, the PTN search); the methods are listed below"


def method_listing() -> dict:
    """`add_parser` arguments that end a command's --help with every method and its summary."""
    import shutil
    import textwrap

    from unlearning.methods import METHODS

    indent = max(map(len, METHODS)) + 4
    columns = min(100, shutil.get_terminal_size().columns) - 2  # as argparse wraps the options
    lines = ["methods (--method):"]
    for name in sorted(METHODS):
        text = f"  {name:<{indent - 2}}{METHODS[name].summary}"
        lines.extend(textwrap.wrap(text, columns, subsequent_indent=" " * indent))
    return {"epilog": "\n".join(lines), "formatter_class": argparse.RawDescriptionHelpFormatter}
