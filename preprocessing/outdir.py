"""Guards of the output folder: it can be written, the disk has room, and every bag in it is made alike.

* :func:`check_writable`: a read-only folder (or sub-folder) fails before any slide is read, naming the folder.
* :func:`check_free_space` / :func:`is_disk_full` / :func:`disk_full_message`: a full disk (ENOSPC, EDQUOT) is
  one line naming the file; the run stops there (every next slide would fail too).
* ``OUT/settings.json`` records the settings that decide what a feature vector means (encoder, weights sha256,
  model kwargs and preprocessing, target mpp, tile size, compute precision, stored dtype). While the folder holds
  bags, :func:`claim_folder` refuses a run with other settings, naming the folder and each difference
  (``--overwrite`` takes the folder over: its bags are retired by the caller); a folder without bags takes the new
  settings. :func:`verify_folder` re-reads the record before each write, so a
  run whose folder was taken over meanwhile stops instead of mixing bags. Per-slide choices (tissue
  threshold, ``--min-tissue``, overlap, mpp tolerance) are not in it: changing them redoes bags as before.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from wsi_ncmi.data.atomic import atomic_write_text, fit_name

from .locks import file_lock
from .plan import BAGS_DIR, COORDS_DIR, LOCKS_DIR, STALE_DIR, THUMBS_DIR
from .readers import SlideError

log = logging.getLogger(__name__)

__all__ = ["SETTINGS_FILE", "OUTPUT_SUBDIRS", "FolderSettingsError", "folder_settings", "claim_folder", "verify_folder",
           "check_writable", "check_free_space", "is_disk_full", "disk_full_message"]

SETTINGS_FILE = "settings.json"
OUTPUT_SUBDIRS = (BAGS_DIR, THUMBS_DIR, LOCKS_DIR, COORDS_DIR, STALE_DIR)  # checked writable
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
TILING_KEYS = ("target_mpp", "patch_size")  # recorded by every run (a seg,tile run has no encoder)
# choose tiles, or change pixels by well under a grey level (read path: fast vs exact decode, feature cosine
# >= 0.998): a bag made otherwise is redone, the folder is not refused
PER_SLIDE_KEYS = ("overlap", "min_tissue", "mpp_tolerance", "tissue", "read_path", "jpeg_decode")


class FolderSettingsError(SlideError):
    """The output folder holds bags made with other settings; the message names the folder and the differences."""


# ----------------------------------------------------------------------------------------- writable, disk
def check_writable(out: Path, subdirs: tuple[str, ...]) -> None:
    """Create and remove a probe file in ``out`` and each existing ``out/<subdir>``; raises :class:`SlideError`
    naming the first folder that cannot be written (read-only mount, permissions)."""
    for folder in (out, *(out / s for s in subdirs)):
        if folder != out and not folder.is_dir():
            continue
        probe = folder / fit_name(".write-test", f".{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            probe.unlink()
        except OSError as e:
            raise SlideError(f"--output {folder}: cannot write in this folder ({e.strerror or e}); give a writable "
                             "--output folder") from None


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_message(path: Path | str, e: OSError) -> str:
    """``<path>: no space left on device (...)``: the one line for a write that hit a full disk or quota."""
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
    detail = e.strerror if e.strerror and e.strerror.lower() not in (what, "no space left on device") else ""
    return f"{path}: {what}{f' ({detail})' if detail else ''}"


def check_free_space(path: Path, need_bytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``path`` when its folder has fewer than ``need_bytes`` free, before the
    file is written (the write itself would fail half-way)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"needs ~{need_bytes / 1e6:.2f} MB, {free / 1e6:.2f} MB free", str(path))


# ----------------------------------------------------------------------------------------- settings record
def folder_settings(fingerprint: dict[str, Any], extract: bool) -> dict[str, Any]:
    """The part of a run's settings fingerprint the whole folder must share."""
    if not extract:
        return {k: fingerprint[k] for k in TILING_KEYS}
    return {k: v for k, v in fingerprint.items() if k not in PER_SLIDE_KEYS}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FolderSettingsError(f"{path}: cannot read the output folder's settings record ({e}); restore it or "
                                  "use a new --output folder") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise FolderSettingsError(f"{path}: not a wsi-preprocess settings record; restore it or use a new --output "
                                  "folder")
    return data["settings"]


def _diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{k} {stored[k]!r} -> {wanted[k]!r}" for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]


def claim_folder(out: Path, wanted: dict[str, Any], overwrite: bool, record: bool = True) -> list[str]:
    """Record ``wanted`` in ``out/settings.json`` or check it against the record there (``record=False``: only
    check, e.g. before an encoder is built).

    Returns [] when the folder is new, made with the same settings (keys it lacked are added) or holds no bag
    (the record is replaced: a run still writing with the old settings stops at :func:`verify_folder`); the list
    of differences when ``overwrite`` takes a folder with bags over (the record is replaced; the caller retires
    the bags). Raises :class:`FolderSettingsError` naming the folder and the differences otherwise."""
    path = out / SETTINGS_FILE
    with file_lock(out / (SETTINGS_FILE + ".lock")):
        stored = _read(path)
        diff = _diff(stored, wanted) if stored is not None else []
        bags = bool(diff) and any((out / BAGS_DIR).glob("*.h5"))
        if bags and not overwrite:
            raise FolderSettingsError(
                f"--output {out}: its bags were made with other settings ({path}): {'; '.join(diff)}; use a new "
                "--output folder, or --overwrite to redo the slides with these settings (the folder's bags are "
                "then moved to stale/)")
        merged = dict(wanted) if diff else {**(stored or {}), **wanted}
        if record and merged != stored:
            atomic_write_text(path, json.dumps({"settings": merged, "written_by": "wsi-preprocess"}, indent=1,
                                               sort_keys=True) + "\n")
    if diff and record:
        log.warning("--output %s: new settings (%s)%s: the folder now records them", out, "; ".join(diff),
                    " taken over with --overwrite" if bags else ", no bag was made with the old ones")
    return diff if bags else []


def verify_folder(out: Path, wanted: dict[str, Any]) -> None:
    """Raise :class:`FolderSettingsError` when ``out/settings.json`` no longer records ``wanted`` (another run
    took the folder over with ``--overwrite`` meanwhile): nothing more is written by this run."""
    stored = _read(out / SETTINGS_FILE) or {}
    diff = _diff(stored, wanted)
    if diff:
        raise FolderSettingsError(f"--output {out}: another run changed the folder's settings while this one ran "
                                  f"({out / SETTINGS_FILE}: {'; '.join(diff)}); this run stopped without writing "
                                  "more")
