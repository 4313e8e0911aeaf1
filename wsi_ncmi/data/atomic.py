"""Atomic file output for results a user keeps: write beside the target, fsync, ``os.replace``.

A reader (or a crash) never sees a half-written file; on an error the temporary file is removed and the
previous version of the target, if any, is left as it was. Temporary names stay within the file system's
255-byte limit however long the target's name is (:func:`fit_name`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["NAME_MAX", "atomic_output", "atomic_write_text", "fit_name", "staged_folder"]

logger = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in one file name on Linux / macOS file systems


def fit_name(stem: str, suffix: str, limit: int = NAME_MAX) -> str:
    """``stem + suffix``, or, when that is longer than ``limit`` bytes (UTF-8), the start of ``stem``, ``~`` and
    12 hex digits of its sha1, then ``suffix``: a name that fits, distinct for distinct stems. Internal names
    (temporary files, retired copies, broken locks) add to a user's file name; a legal 245-character slide name
    must not make them too long for the file system."""
    name = stem + suffix
    if len(name.encode("utf-8")) <= limit:
        return name
    tag = "~" + hashlib.sha1(stem.encode("utf-8")).hexdigest()[:12]
    room = limit - len((tag + suffix).encode("utf-8"))
    head = stem.encode("utf-8")[:max(room, 0)].decode("utf-8", "ignore")
    return head + tag + suffix


def _new_temp(path: Path) -> Path:
    """Create an empty, unique ``.<name>.<random>.tmp`` beside ``path``, with the mode a plain ``open`` would
    give it (0o666 less the umask). ``tempfile.mkstemp`` would create it 0o600 and the finished file would
    keep that mode, unreadable to the group whatever the user's umask."""
    for _ in range(100):
        tmp = path.parent / fit_name(f".{path.name}", f".{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (``np.save``, ``savefig``, ...); on success it is
    fsync'ed and renamed to ``path``, on an exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return path


@contextmanager
def staged_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new, empty folder ``.<name>.<random>.partial`` beside ``path`` to fill; on success it takes the
    place of ``path`` (a previous ``path`` is first renamed to ``.<name>.<random>.old`` and deleted after the
    swap), on an exception it is deleted and ``path`` is left as it was.

    So a folder of results is never seen half-written or mixed with an older run's files: a killed process
    leaves the old folder intact plus a ``.partial`` sibling (safe to delete). Only a kill between the two renames
    leaves the old folder as ``.<name>.*.old`` beside no ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    stage = path.parent / fit_name(f".{path.name}.{token}", ".partial")
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = path.parent / fit_name(f".{path.name}.{token}", ".old")
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.rename(old, path)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.debug("%s: replaced by a complete new version", path)
