"""`unlearn`: the command line, one module per command group; user errors are one line.

    unlearn train      --data DATA [--arch FACTORY] [--epochs E] [--seed S] --out CKPT (models)
    unlearn import     --factory FACTORY --weights FILE --input-shape C,H,W --out CKPT (models)
    unlearn evaluate   --model CKPT --data DATA [--forget SPEC] [--references DIR]    (models)
    unlearn references --model CKPT --data DATA --out DIR [--count K] [--workers N]   (models)
    unlearn hyperforget train --model CKPT --data DATA --out HYPERNET [--runs N]      (models)
    unlearn importance --model CKPT --data DATA --out STORE [--workers N] ...         (importance)
    unlearn forget     --model CKPT --data DATA --forget SPEC --out DIR [--method M]  (forget)
    unlearn search     ... --search CONFIG; unlearn history --model-name NAME         (forget)
    unlearn requests   add | list | show | process                                    (requests)
    unlearn ui; unlearn demo                                                          (tools)

The global flags (`--quiet`, `--verbose`) go before or after the command. Diagnostics go
through `logging` to stderr: warnings always, this project's info and debug lines with
`--verbose`; results go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipelines.cli import forget, importance, models, requests, tools
from pipelines.ray_session import stop_ray
from unlearning.errors import UserError
from unlearning.tempdirs import remove_dead_scratch

GROUPS = (models, importance, forget, requests, tools)
EXTRAS = {"ray": "ray", "mlflow": "mlflow", "sqlalchemy": "ledger", "optuna": "ray", "yaml": "ray",
          "tqdm": "ray", "matplotlib": "mlflow", "psycopg": "postgres",
          "alembic": "ledger"}  # module -> the extra installing it
IN_ALL = ("ray", "mlflow", "ledger")  # the extras `amnesis[all]` brings
PROJECT_LOGGERS = ("pipelines", "unlearning")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("amnesis")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def add_global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """--quiet and --verbose on the top parser and on every command's parser.

    Below the top, the defaults are SUPPRESS: a command's parser would otherwise overwrite a
    flag given before the command with its own default (argparse copies sub-namespaces up).
    """
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars", **default)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log this project's diagnostics (info and debug lines) to stderr", **default)


def command_parsers(parser: argparse.ArgumentParser):
    """Every parser below `parser` (commands, and actions such as `requests add`), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield sub
                yield from command_parsers(sub)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`unlearn forget: error: ...`) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="unlearn", description="Make trained models forget data.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed amnesis version and exit")
    add_global_flags(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    for sub in command_parsers(parser):
        add_global_flags(sub, top=False)
    return parser


class _LineFormatter(logging.Formatter):
    """`unlearn COMMAND: warning: message`, as the one-line errors read (logger name if verbose)."""

    def __init__(self, command: str, verbose: bool):
        super().__init__()
        self.command, self.verbose = command, verbose

    def format(self, record: logging.LogRecord) -> str:
        where = f" [{record.name}]" if self.verbose else ""
        line = f"unlearn {self.command}: {record.levelname.lower()}:{where} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (tests and tools swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_handler: logging.Handler | None = None


def configure_logging(command: str, verbose: bool) -> None:
    """One stderr handler on the root logger (replaced, not added, when main runs again)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _StderrHandler()
    _handler.setFormatter(_LineFormatter(command, verbose))
    root.addHandler(_handler)
    for name in PROJECT_LOGGERS:  # others' loggers keep the root's level (warnings)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.command, args.verbose)
    remove_dead_scratch()  # what killed commands left in the temporary directory
    os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI writes PNGs, never opens a window; a user's choice wins
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"unlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        extra = EXTRAS[top]
        print(f"unlearn {args.command}: error: this command needs {top}; pip install 'amnesis[{extra}]'"
              + (" (or 'amnesis[all]')" if extra in IN_ALL else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop_ray()  # now, not at exit: no Ray process outlives the command
        print(f"unlearn {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
