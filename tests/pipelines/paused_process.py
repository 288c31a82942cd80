"""A child process for the fault tests: a request that stops at a chosen step.

    python paused_process.py LEDGER_URL CHECKPOINT OUT_ROOT MODEL_NAME STEP MARKER
    python paused_process.py --cli STEP MARKER UNLEARN_ARGS...

The first runs `process_pending` (the ledger's steps "claimed", "unlearning", then the
request's "written", "run_created", "version_registered", "recorded", then "registered",
"finished"); the second runs the `unlearn` command line (e.g. `forget`, or `requests
process`). At STEP it writes MARKER and sleeps until the test kills it with a real SIGKILL.
The fault point is passed in as an argument of `process_pending` / `run_forget`: the product
has no test hooks of its own.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.ledger import Ledger
from pipelines.ledger_jobs import process_pending
from pipelines.options import ForgetOptions


def pause_at(step: str, marker: str, name: str) -> None:
    if name != step:
        return
    with open(marker, "w") as handle:
        handle.write(f"{os.getpid()} {step}\n")
    while True:
        time.sleep(60)


def start_paused(args: list[str], step: str, marker: Path) -> subprocess.Popen:
    """`python paused_process.py ARGS` in a child process, returned once it waits at `step`."""
    child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"process ended before {step}: {child.communicate()}")
        assert time.monotonic() < deadline, f"never reached {step}"
        time.sleep(0.2)
    return child


def main(url: str, checkpoint: str, out_root: str, model_name: str, step: str, marker: str) -> None:
    # the ledger logic is under test: JiT changes every batch's model, and accepting a missed
    # target (a handful of random ids rarely meets it) keeps every batch `done`
    options = ForgetOptions(method="jit", accept_unmet=True, plots=False, show_progress=False)
    process_pending(Ledger(url), model_name, "digits", out_root, checkpoint, options,
                    fault_point=functools.partial(pause_at, step, marker))


def main_cli(step: str, marker: str, *argv: str) -> int:
    """`unlearn ARGV` with the fault point handed to the request and the ledger job."""
    import pipelines.ledger_jobs
    import pipelines.request
    from pipelines.cli import main as unlearn

    pause = functools.partial(pause_at, step, marker)
    pipelines.request.run_forget = functools.partial(pipelines.request.run_forget, fault_point=pause)
    pipelines.ledger_jobs.process_pending = functools.partial(process_pending, fault_point=pause)
    return unlearn(list(argv))


if __name__ == "__main__":
    if sys.argv[1] == "--cli":
        sys.exit(main_cli(*sys.argv[2:]))
    main(*sys.argv[1:])
