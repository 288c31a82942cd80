"""`unlearn ui` (MLflow's UI on this project's store) and `unlearn demo` (the quick-start)."""

from __future__ import annotations

import os
import sys


def add_commands(commands) -> None:
    ui = commands.add_parser("ui", help="browse runs and model versions in MLflow's UI")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.set_defaults(func=cmd_ui)

    demo = commands.add_parser("demo", help="the quick-start on the built-in digits data")
    demo.add_argument("--root", default="demo-output", help="where the run directory is created")
    demo.set_defaults(func=cmd_demo)


def cmd_ui(args) -> int:
    """MLflow's own UI on the store every command writes to."""
    from pipelines.tracking import tracking_uri

    uri = tracking_uri()
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, command)
    return 0  # not reached


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    run_demo(args.root, quiet=args.quiet)
    return 0
