"""A child process for the ledger tests: `process_pending` that stops at a chosen step.

    python paused_process.py LEDGER_URL CHECKPOINT OUT_ROOT MODEL_NAME STEP MARKER

At STEP ("claimed", "unlearning", "logged", "registered", "finished") it writes MARKER and
sleeps until the test kills it with a real SIGKILL. The fault point is passed in as an
argument of `process_pending`: the product has no test hooks of its own.
"""

from __future__ import annotations

import os
import sys
import time

from pipelines.ledger import Ledger
from pipelines.ledger_jobs import process_pending
from pipelines.request import ForgetOptions


def main(url: str, checkpoint: str, out_root: str, model_name: str, step: str, marker: str) -> None:
    def pause_at(name: str) -> None:
        if name != step:
            return
        with open(marker, "w") as handle:
            handle.write(f"{os.getpid()} {step}\n")
        while True:
            time.sleep(60)

    options = ForgetOptions(method="ssd", plots=False, show_progress=False)  # the ledger logic is under test
    process_pending(Ledger(url), model_name, "digits", out_root, checkpoint, options, fault_point=pause_at)


if __name__ == "__main__":
    main(*sys.argv[1:])
