"""Output folders and files a command writes: checked before the work, and write failures named in one line.

:func:`check_output_dir` refuses, before anything is computed, an output folder that is an existing file, lies under
a file, or is on a read-only file system (``statvfs``, which also holds for root, whom permission bits do not stop).
:func:`output_error` turns an ``OSError`` of a write (disk full, quota, read-only, permission) into an
:class:`OutputError` whose message names the file or folder; the commands print it as their one error line.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from wsi_ncmi.errors import UserError

__all__ = ["OUTPUT_ERRNOS", "OutputError", "check_output_dir", "check_output_file", "output_error"]

#: errors of a write the user fixes (free space, permissions, another path), not a bug of ours
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST,
                           errno.ENOTDIR, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG})


class OutputError(UserError):
    """An output path cannot be written (a file where a folder is needed, read-only, disk full, ...)."""


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return False


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` can become (or already is) a writable folder; else :class:`OutputError` naming it with ``flag``
    (the option that gave it, e.g. ``--out``). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is an existing file, not a folder; give a folder path")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, so no folder can be made below it")
    if _read_only(base) or not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only(base) else "is not writable"
        raise OutputError(f"{flag} {path}: {base} {why}; give a folder you can write to")
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` can be written as a file (it is not a folder; its folder can be made and written)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give the file to write (e.g. {path / 'heatmap.png'})")
    check_output_dir(path.parent, flag)
    return path


def output_error(exc: OSError, where: str | os.PathLike) -> OutputError | None:
    """An :class:`OutputError` for a failed write ``exc`` (None when ``exc`` is not one the user fixes), naming
    the file the error carries, else ``where`` (the output folder)."""
    if exc.errno not in OUTPUT_ERRNOS:
        return None
    target = exc.filename if exc.filename is not None else where
    reason = exc.strerror or os.strerror(exc.errno or 0)
    hint = {errno.ENOSPC: "; free some space and run again", errno.EDQUOT: "; free some space and run again",
            errno.EROFS: "; give an output folder on a writable disk"}.get(exc.errno or 0, "")
    return OutputError(f"{target}: cannot write: {reason}{hint}")
