"""Test-only pause points for killing a real process at a chosen step.

With AMNESIS_TEST_PAUSE_AT=<step> and AMNESIS_TEST_MARKER=<file>, `pause_point(step)` writes
the marker and sleeps until the process is killed, so a test can send a real SIGKILL at
exactly that step. Without the variables it does nothing.
"""

from __future__ import annotations

import os
import time


def pause_point(step: str) -> None:
    if os.environ.get("AMNESIS_TEST_PAUSE_AT") != step:
        return
    marker = os.environ.get("AMNESIS_TEST_MARKER")
    if marker:
        with open(marker, "w") as handle:
            handle.write(f"{os.getpid()} {step}\n")
    while True:
        time.sleep(60)
