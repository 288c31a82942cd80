"""Stopping a server a test started in a session of its own (`start_new_session=True`): its
process group holds it and every process it started, and nothing else on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def group_gone(process: subprocess.Popen, seconds: float) -> bool:
    """Whether every process of `process`'s group has ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        process.poll()  # reaps the leader: a zombie still counts as a member of its group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the whole group (what `ray stop` sends), SIGKILL to what is left after `grace` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if group_gone(process, grace):
            return
