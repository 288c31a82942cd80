"""Outputs that appear whole or not at all, and never replace an existing path.

Every file or directory the project writes is staged as a hidden sibling (`.NAME.partial-PID-X`,
unlearning.tempdirs) and renamed into place when complete; a killed writer's staging is swept
by the next writer of that name. `check_output_path` finds, before any work, an output that
could not be written (it exists, a read-only or full file system, a name too long).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from unlearning.errors import UserError
from unlearning.tempdirs import owned, remove_dead_owners, staging_prefix


class OutputExists(UserError):
    """An output path that exists already: nothing is overwritten."""

    def __init__(self, out):
        super().__init__(f"{out} already exists; choose a new output path (nothing is overwritten)")


@contextmanager
def atomic_directory(out: str | os.PathLike):
    """Yield a temporary sibling directory; rename it to `out` only if the block succeeds.

    `out` must not exist: inputs and earlier outputs are never overwritten.
    """
    out = Path(out)
    if out.exists():
        raise OutputExists(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_owners(out.parent, staging_prefix(out.name))  # what a killed run left for this name
    staging = Path(tempfile.mkdtemp(prefix=owned(staging_prefix(out.name)), dir=out.parent))
    try:
        yield staging
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STAGING_SUFFIX_BYTES = 40  # what a staging sibling adds to a name: ".", ".partial-", a pid, random letters


def check_output_path(out: str | os.PathLike, root: bool = False) -> Path:
    """`out` as a Path if this process can create it, else a one-line UserError, before any work.

    `out` must not exist (unless `root`: a directory that outputs go into), its name must leave
    room for its staging sibling's, and the nearest existing ancestor must be a directory where a
    directory can be made: a probe is made there and removed, so read-only, full or virtual
    file systems (/proc) and permissions are found now rather than after the computation.
    """
    out = Path(out)
    if not root and os.path.lexists(out):  # lexists: False (not an error) for a name too long
        raise OutputExists(out)
    if root and os.path.lexists(out):
        if not out.is_dir():
            raise UserError(f"{out} is not a directory")
        ancestor, missing = out, []
    else:
        ancestor, missing = out.parent, [out.name]
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            missing.insert(0, ancestor.name)
            ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {out}: {ancestor} is a file, not a directory")
    try:
        longest = os.pathconf(ancestor, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf here, or the file system does not say
        longest = 255
    for name in missing:
        if len(os.fsencode(name)) + STAGING_SUFFIX_BYTES > longest:
            raise UserError(f"cannot create {out}: the name {name[:40]}... is too long "
                            f"(at most {longest - STAGING_SUFFIX_BYTES} bytes here)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".amnesis-probe-", dir=ancestor))
    except OSError as error:
        raise UserError(f"cannot create {out}: {error.strerror or error} in {ancestor}") from None
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 file via a temporary sibling and a rename; refuses to replace an existing file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary sibling and a rename; refuses to replace an existing file."""
    path = Path(path)
    if path.exists():
        raise OutputExists(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_owners(path.parent, staging_prefix(path.name))
    handle, staging = tempfile.mkstemp(prefix=owned(staging_prefix(path.name)), dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.rename(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
