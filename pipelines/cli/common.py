"""What every command group shares: argument types and the 'extras missing' message."""

from __future__ import annotations

import argparse

from pipelines.request import parse_param
from unlearning.errors import UserError


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def key_value(text: str) -> tuple[str, object]:
    """argparse type of `--param KEY=VALUE`."""
    try:
        return parse_param(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
