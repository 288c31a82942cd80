"""Temporary directories and staging files, named after the process that owns them.

A scratch directory is `amnesis-<pid>-<what>-XXXXXXXX` in the system's temporary directory
(`tempfile.gettempdir()`: TMPDIR moves it); an output is staged next to itself as
`.NAME.partial-<pid>-XXXXXXXX` and renamed into place when complete (unlearning.checkpoint).
The work that makes one removes it when it ends, on success, error or Ctrl-C: `scratch()` for
a block, `new_scratch()` for a directory some later step still reads (removed at exit at the
latest). A process killed outright (SIGKILL, the OOM killer) cannot; what it left is removed
by the next process that looks there (`remove_dead_owners`): an entry whose pid no longer
runs on this machine goes, a live process's stays. Names from before the pid was in them
(`amnesis-model-XXXXXXXX`, `.NAME.partial-XXXXXXXX`) go once a day old.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SCRATCH = "amnesis-"
LEGACY_SCRATCH = ("model", "log", "ids", "tune", "importance", "api")  # `amnesis-WHAT-XXXXXXXX`, no pid
LEGACY_AGE_SECONDS = 24 * 3600
RANDOM = "[a-z0-9_]{8}"  # what tempfile.mkdtemp / mkstemp append

_owned: set[tuple[int, Path]] = set()  # (creating pid, directory) to remove at exit


def staging_prefix(name: str) -> str:
    """The prefix of `name`'s staging siblings, without the owner: `.NAME.partial-`."""
    return f".{name}.partial-"


def owned(prefix: str) -> str:
    """`prefix` followed by this process's pid: what to give mkdtemp / mkstemp."""
    return f"{prefix}{os.getpid()}-"


def new_scratch(what: str) -> Path:
    """A new scratch directory `amnesis-<pid>-<what>-XXXXXXXX`, removed at exit at the latest."""
    remove_dead_scratch()
    path = Path(tempfile.mkdtemp(prefix=owned(SCRATCH) + f"{what}-"))
    _owned.add((os.getpid(), path))
    return path


@contextmanager
def scratch(what: str):
    """A scratch directory for the block, removed when the block ends, however it ends."""
    path = new_scratch(what)
    try:
        yield path
    finally:
        remove(path)


def remove(path: str | os.PathLike) -> None:
    """Remove a scratch directory or staging entry (gone already is fine)."""
    path = Path(path)
    _owned.discard((os.getpid(), path))
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@atexit.register
def _remove_owned() -> None:
    for pid, path in list(_owned):
        if pid == os.getpid():  # a forked child leaves its parent's directories alone
            remove(path)


def remove_dead_scratch() -> list[Path]:
    """Remove dead processes' scratch directories from the temporary directory."""
    return remove_dead_owners(Path(tempfile.gettempdir()), SCRATCH, legacy=LEGACY_SCRATCH)


def remove_dead_owners(directory: Path, prefix: str, legacy: tuple[str, ...] = ("",)) -> list[Path]:
    """Remove the entries `<prefix><pid>-...` of `directory` whose pid is not alive, and the
    pid-less `<prefix><legacy>XXXXXXXX` ones untouched for a day; returns what was removed."""
    owner = re.compile(re.escape(prefix) + r"(\d+)-(?:[a-z]+-)?" + RANDOM)
    old = re.compile(re.escape(prefix) + "(?:" + "|".join(f"{re.escape(w)}-" if w else "" for w in legacy) + ")" + RANDOM)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = owner.fullmatch(entry.name)
        if match:
            stale = not alive(int(match.group(1)))
        else:
            stale = bool(old.fullmatch(entry.name)) and _age(entry) > LEGACY_AGE_SECONDS
        if stale:
            remove(entry.path)
            removed.append(Path(entry.path))
    return removed


def alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:
        return True
    return True


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0
