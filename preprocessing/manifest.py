"""``OUT_DIR/manifest.csv``: one row per slide, rewritten atomically (merged under a lock) after each slide."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from wsi_ncmi.data.atomic import atomic_output as atomic_path

from .locks import file_lock

__all__ = ["STATUSES", "ROW_STATUSES", "MISSING_SOURCE", "COLUMNS", "Manifest", "read_manifest", "summary_table",
           "atomic_path", "atomic_write_bytes"]

STATUSES = ("ok", "no_tissue", "mpp_missing", "unreadable", "error", "skipped")  # outcomes of a run
# a row whose slide file was deleted or moved after it was processed (set by a later run)
MISSING_SOURCE = "missing_source"
ROW_STATUSES = (*STATUSES, MISSING_SOURCE)
COLUMNS = ("slide_id", "path", "status", "n_tiles", "bad_tiles", "mpp", "effective_mpp", "seconds", "message")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync + rename); returns ``path``. An ``OSError`` (e.g. a full
    disk, whose error names no file) is raised naming ``path``."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """``{slide_id: row}`` of a manifest file ({} when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


class Manifest:
    """Rows keyed by slide id; :meth:`update` merges one row into the file shared by all processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = self.path.with_name(self.path.name + ".lock")

    def update(self, row: Mapping[str, object], keep_ok: bool = False) -> None:
        """Write ``row`` (missing columns empty). ``keep_ok``: leave an existing ``ok`` row untouched (and put
        back ``ok`` on a ``missing_source`` row whose file is at its path again)."""
        self.update_many([row], keep_ok=keep_ok)

    def update_many(self, new_rows: Iterable[Mapping[str, object]], keep_ok: bool = False) -> None:
        """:meth:`update` for several rows with one rewrite of the file."""
        cleaned = []
        for row in new_rows:
            if row.get("status") not in ROW_STATUSES:
                raise ValueError(f"manifest status must be one of {ROW_STATUSES}, got {row.get('status')!r}")
            cleaned.append({c: "" if row.get(c) is None else str(row.get(c)) for c in COLUMNS})
        with file_lock(self.lock):
            rows = read_manifest(self.path)
            for clean in cleaned:
                old = rows.get(clean["slide_id"], {})
                if keep_ok and old.get("status") == "ok":
                    continue
                if keep_ok and old.get("status") == MISSING_SOURCE and old.get("path") == clean["path"]:
                    clean = {**old, "status": "ok", "message": ""}  # the file is back and its bag still fits
                rows[clean["slide_id"]] = clean
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for sid in sorted(rows):
                w.writerow(rows[sid])
            atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))

    def rows(self) -> dict[str, dict[str, str]]:
        return read_manifest(self.path)


def summary_table(statuses: Mapping[str, str] | list[str]) -> str:
    """A small text table: count per status (all statuses listed, in order)."""
    values = list(statuses.values()) if isinstance(statuses, Mapping) else list(statuses)
    counts = Counter(values)
    width = max(len(s) for s in STATUSES)
    lines = [f"{'status':<{width}}  count", f"{'-' * width}  -----"]
    lines += [f"{s:<{width}}  {counts.get(s, 0):>5}" for s in STATUSES]
    lines.append(f"{'total':<{width}}  {sum(counts.values()):>5}")
    return "\n".join(lines)
