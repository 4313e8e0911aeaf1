"""``OUT_DIR/manifest.csv``: one row per slide, rewritten atomically (merged under a lock) after each slide."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from wsi_ncmi.data.atomic import atomic_output as atomic_path

from .locks import file_lock

__all__ = ["STATUSES", "COLUMNS", "Manifest", "read_manifest", "summary_table", "atomic_path",
           "atomic_write_bytes"]

STATUSES = ("ok", "no_tissue", "mpp_missing", "unreadable", "error", "skipped")
COLUMNS = ("slide_id", "path", "status", "n_tiles", "bad_tiles", "mpp", "effective_mpp", "seconds", "message")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync + rename); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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
        """Write ``row`` (missing columns empty). ``keep_ok``: leave an existing ``ok`` row untouched."""
        if row.get("status") not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {row.get('status')!r}")
        clean = {c: "" if row.get(c) is None else str(row.get(c)) for c in COLUMNS}
        with file_lock(self.lock):
            rows = read_manifest(self.path)
            if keep_ok and rows.get(clean["slide_id"], {}).get("status") == "ok":
                return
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
