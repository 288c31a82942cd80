"""`unlearn`: the command line, one module per command group; user errors are one line.

    unlearn train      --data DATA [--arch NAME] [--epochs E] [--seed S] --out CKPT   (models)
    unlearn evaluate   --model CKPT --data DATA [--forget SPEC] [--out FILE]          (models)
    unlearn importance --model CKPT --data DATA --out STORE [--workers N] ...         (importance)
    unlearn forget     --model CKPT --data DATA --forget SPEC --out DIR [--method M]  (forget)
    unlearn search     ... --search CONFIG; unlearn history --model-name NAME         (forget)
    unlearn requests   add | list | show | process                                    (requests)
    unlearn ui; unlearn demo                                                          (tools)
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import forget, importance, models, requests, tools
from unlearning.errors import UserError

GROUPS = (models, importance, forget, requests, tools)
EXTRAS = {"ray": "ray", "mlflow": "mlflow", "sqlalchemy": "ledger", "optuna": "ray", "yaml": "ray",
          "tqdm": "ray", "matplotlib": "mlflow"}  # module -> the amnesis extra that installs it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Make trained models forget data.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"unlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"unlearn {args.command}: error: this command needs {top}; "
              f"pip install 'amnesis[{EXTRAS[top]}]' (or 'amnesis[all]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unlearn {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
