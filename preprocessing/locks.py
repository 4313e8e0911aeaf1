"""Per-slide lock files so several processes (or machines on a shared disk) can share one output folder.

A lock is a file created with ``O_CREAT | O_EXCL`` holding ``{"pid", "host", "time"}`` of the owning
(main) process. A lock is stale, and is broken, when its owner is on this host and no longer runs, when
it names no owner (empty or garbage, e.g. left by a process killed between creating and writing it) and
is older than ``OWNERLESS_GRACE_S``, or when it is older than ``timeout_s`` (owners on other hosts cannot
be probed). Breaking renames the file
to a unique name first (atomic), so two processes cannot both break and then both acquire it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from wsi_ncmi.data.atomic import fit_name

log = logging.getLogger(__name__)

__all__ = ["LockInfo", "try_lock", "release_lock", "read_lock", "is_stale", "file_lock", "HOST"]

HOST = socket.gethostname()
# an owner writes its record right after creating the lock: a lock still without one after this long is
# left over from a crash
OWNERLESS_GRACE_S = 10.0


class LockInfo(dict):
    """The content of a lock file: pid, host, time."""


def read_lock(path: str | Path) -> LockInfo | None:
    try:
        return LockInfo(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # empty, half-written or garbage: a lock without an owner record
        try:
            return LockInfo(pid=-1, host="?", time=Path(path).stat().st_mtime, ownerless=True)
        except FileNotFoundError:
            return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _has_owner(info: LockInfo) -> bool:
    """Whether ``info`` names an owner process (a positive pid and a host)."""
    if info.get("ownerless"):
        return False
    try:
        return int(info.get("pid", -1)) > 0 and bool(info.get("host"))
    except (TypeError, ValueError):
        return False


def is_stale(info: LockInfo, timeout_s: float) -> bool:
    try:
        age = time.time() - float(info.get("time", 0))
    except (TypeError, ValueError):
        age = float("inf")
    if age > timeout_s:
        return True
    if not _has_owner(info):
        return age > OWNERLESS_GRACE_S
    return info.get("host") == HOST and not _pid_alive(int(info.get("pid", -1)))


def try_lock(path: str | Path, timeout_s: float = 6 * 3600, owner_pid: int | None = None) -> bool:
    """Create lock ``path`` for ``owner_pid`` (default: this process); False if someone else holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"pid": owner_pid or os.getpid(), "host": HOST, "time": time.time()})
    for _ in range(2):  # second round after breaking a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(path)
            if info is None:
                continue  # released meanwhile
            if not is_stale(info, timeout_s):
                return False
            grave = path.with_name(fit_name(path.name, f".stale.{os.getpid()}.{time.monotonic_ns()}"))
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                continue
            moved = read_lock(grave)
            if moved is not None and not is_stale(moved, timeout_s):  # lost a race: put the fresh lock back
                with contextlib.suppress(OSError):
                    os.rename(grave, path)
                return False
            if _has_owner(info):
                log.warning("broke stale lock %s (pid %s on %s)", path, info.get("pid"), info.get("host"))
            else:
                log.warning("broke stale lock %s: it names no owner process (empty or unreadable, left by a "
                            "crashed process)", path)
            with contextlib.suppress(OSError):
                os.unlink(grave)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(payload)
        except OSError:  # e.g. a full disk: no empty lock is left behind to block the slide later
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return True
    return False


def release_lock(path: str | Path, owner_pid: int | None = None) -> bool:
    """Remove lock ``path`` if this host's ``owner_pid`` (default: this process) holds it."""
    info = read_lock(path)
    if info is None or info.get("host") != HOST or int(info.get("pid", -1)) != (owner_pid or os.getpid()):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = 60.0, poll_s: float = 0.02) -> Iterator[None]:
    """Hold a short-lived lock (e.g. around a manifest update), waiting for it up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not try_lock(path, timeout_s=timeout_s):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: could not acquire lock within {timeout_s:.0f}s")
        time.sleep(poll_s)
    try:
        yield
    finally:
        release_lock(path)
