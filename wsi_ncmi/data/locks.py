"""A lock file on an output folder, so that two processes never write into the same folder at once.

The lock is ``<folder>/<name>``, created with ``O_CREAT | O_EXCL`` and holding ``{"pid", "host", "time",
"purpose"}`` of its owner. A second process is refused with :class:`LockHeldError` naming the folder and the
holder. A lock is stale, and taken over, when its owner ran on this host and is gone (killed, crashed), or when it
names no owner (empty or garbage) and is older than :data:`OWNERLESS_GRACE_S`; a lock of another host cannot be
probed and is never taken over (the message says to remove it). Taking over renames the stale file first (atomic),
so two processes cannot both take it. ``preprocessing/locks.py`` keeps its own per-slide locks (it may not import
this package beyond the bag schema).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

__all__ = ["HOST", "LockHeldError", "acquire_folder_lock", "lock_holder", "release_folder_lock"]

logger = logging.getLogger(__name__)

HOST = socket.gethostname()
OWNERLESS_GRACE_S = 10.0


class LockHeldError(UserError):
    """Another process holds the lock of an output folder; the message names the folder and the holder."""


def lock_holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of lock file ``path`` (``{}`` for an unreadable one), or None when there is no lock."""
    try:
        info = json.loads(Path(path).read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(info: dict[str, Any], path: Path) -> bool:
    try:
        pid, host = int(info["pid"]), str(info["host"])
    except (KeyError, TypeError, ValueError):  # no owner record: left by a crash between create and write
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > OWNERLESS_GRACE_S
        return False
    return host == HOST and (pid <= 0 or not _alive(pid))


def _describe(info: dict[str, Any]) -> str:
    try:
        since = datetime.fromtimestamp(float(info["time"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        since = "an unknown time"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"


def acquire_folder_lock(folder: str | os.PathLike, name: str, purpose: str) -> Path:
    """Create ``folder`` (if needed) and its lock ``folder/name`` for this process; return the lock path.

    ``purpose`` (e.g. ``"wsi-ncmi fit"``) is recorded and named in the refusal. Raises :class:`LockHeldError`
    when a live process holds it; ``OSError`` when the folder cannot be written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    record = json.dumps({"pid": os.getpid(), "host": HOST, "time": time.time(), "purpose": purpose})
    for _ in range(3):  # later rounds after taking over a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = lock_holder(path)
            if info is None:
                continue  # released meanwhile
            if not _stale(info, path):
                raise LockHeldError(
                    f"{folder}: another {info.get('purpose', 'process')} is writing into this folder "
                    f"({_describe(info)}; lock {path}); wait for it to end or choose another folder"
                    + ("" if info.get("host", HOST) == HOST else
                       f" (a lock of another host is never taken over: remove {path} if that run is gone)")
                ) from None
            grave = path.with_name(f"{path.name}.stale.{os.getpid()}.{time.monotonic_ns()}")
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                continue
            logger.warning("%s: took over the lock of a process that is gone (%s)", folder, _describe(info))
            with contextlib.suppress(OSError):
                os.unlink(grave)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        return path
    raise LockHeldError(f"{folder}: could not take the lock {path} (other processes keep taking it)")


def release_folder_lock(path: str | os.PathLike) -> bool:
    """Remove lock ``path`` when this process holds it; True if removed."""
    info = lock_holder(path)
    if not info or info.get("host") != HOST or info.get("pid") != os.getpid():
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
