"""Leftovers and Ctrl-C (issue #15): what a killed run leaves is removed by the next one, a live
run's is kept, and Ctrl-C stops a Ray run within seconds, leaving no process and no output.

Processes are real ones (SIGKILL, SIGINT to the process group as a terminal sends it); they are
found through /proc: every process of the command's session, Ray's workers included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.cli import main

CLI = [sys.executable, "-m", "pipelines.cli", "--quiet"]
KILLED_MID_WRITE = """
import sys, time
from unlearning.outputs import atomic_directory
from unlearning.tempdirs import new_scratch

new_scratch("model")
with atomic_directory(sys.argv[1]) as staging:
    (staging / "importance.safetensors").write_bytes(bytes(1000))
    print("writing", flush=True)
    time.sleep(600)
"""


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def environment(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def importance(checkpoint, out, *extra: str) -> list[str]:
    return ["importance", "--model", str(checkpoint), "--data", "digits", "--out", str(out), *extra]


def test_the_next_command_removes_dead_runs_leftovers_and_keeps_live_ones(
    untrained_digits_checkpoint, tmp_path, monkeypatch
):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    live = subprocess.Popen(["sleep", "120"])
    dead, two_days_ago = dead_pid(), time.time() - 2 * 86400
    try:
        gone = [tmp_path / f".store.partial-{dead}-k2j4x8q1", scratch_root / f"amnesis-{dead}-model-ab12cd34",
                tmp_path / ".store.partial-oldform1", scratch_root / "amnesis-model-oldform1"]
        kept = [tmp_path / f".store.partial-{live.pid}-k2j4x8q1", scratch_root / f"amnesis-{live.pid}-model-ab12cd34",
                tmp_path / ".store.partial-newform1", scratch_root / "amnesis-model-newform1",
                tmp_path / f".other.partial-{dead}-k2j4x8q1", scratch_root / "amnesis-notes"]
        for path in gone + kept:
            (path / "sub").mkdir(parents=True)
        for path in (gone[2], gone[3]):  # names without a pid go once a day old
            os.utime(path, (two_days_ago, two_days_ago))
        assert main(importance(untrained_digits_checkpoint, tmp_path / "store")) == 0
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "store" / "importance.json").is_file()
    assert [path for path in gone if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []


def test_after_a_run_killed_mid_write_the_next_run_leaves_nothing_behind(untrained_digits_checkpoint, tmp_path):
    scratch_root, out = tmp_path / "tmp", tmp_path / "store"
    scratch_root.mkdir()
    env = environment(TMPDIR=str(scratch_root))
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(out)], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert killed.stdout.readline().strip() == "writing"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert [p.name for p in tmp_path.glob(".store.partial-*")] != []  # what a SIGKILL leaves
    assert list(scratch_root.glob(f"amnesis-{killed.pid}-*")) != []

    result = subprocess.run(CLI + importance(untrained_digits_checkpoint, out), capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    assert (out / "importance.json").is_file()
    assert list(tmp_path.glob(".store.partial-*")) == []
    assert list(scratch_root.glob("amnesis-*")) == []


# ------------------------------------------------------------------------------- Ctrl-C on Ray


def processes() -> dict[int, tuple[str, int, str]]:
    """pid -> (state, session id, command line) of every process /proc shows."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        found[int(entry.name)] = (fields[0], int(fields[3]), command.strip())
    return found


def session_of(leader: int) -> dict[int, str]:
    """The live (not zombie) processes of the session `leader` started: its Ray cluster's too."""
    return {pid: command for pid, (state, session, command) in processes().items()
            if session == leader and state != "Z"}


@pytest.mark.ray
def test_ctrl_c_stops_a_ray_importance_run_within_seconds_and_leaves_no_process(
    untrained_digits_checkpoint, tmp_path
):
    out = tmp_path / "store"
    command = CLI + importance(untrained_digits_checkpoint, out, "--ray-min-rows", "0", "--workers", "1")
    # SIGINT as a terminal's foreground process has it: a test run started in the background
    # of a non-interactive shell (`make test &`) ignores SIGINT, and a child inherits that
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=environment(), start_new_session=True, preexec_fn=default_sigint)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 240  # a local Ray start takes ~10 s here, more on a busy machine
    while not any(name.startswith("ray::RayTrainWorker") for name in seen.values()):
        assert run.poll() is None and time.monotonic() < deadline, f"no Ray Train worker started: {seen}"
        seen.update(session_of(run.pid))
        time.sleep(0.2)
    time.sleep(1)  # the worker is computing
    seen.update(session_of(run.pid))
    signals = [line.strip() for line in Path(f"/proc/{run.pid}/status").read_text().splitlines()
               if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]

    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    interrupted = time.monotonic()
    stdout, stderr = run.communicate(timeout=60)
    seconds = time.monotonic() - interrupted

    assert run.returncode == 130, f"{stderr[-1500:]} | stdout {stdout[-300:]!r} | {seconds:.1f} s | {signals}"
    assert seconds < 15
    assert stderr.strip().splitlines() == ["unlearn importance: interrupted; nothing was written"]
    left = session_of(run.pid)
    until = time.monotonic() + 10  # Ray's agents notice their raylet's end within a few seconds
    while left and time.monotonic() < until:
        time.sleep(0.5)
        left = session_of(run.pid)
    assert left == {}, f"left running: {left} (of {len(seen)} processes of the run)"
    assert not out.exists() and list(tmp_path.glob(".store.partial-*")) == []
    assert list(Path(tempfile.gettempdir()).glob(f"amnesis-{run.pid}-*")) == []
