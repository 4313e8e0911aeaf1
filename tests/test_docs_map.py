"""docs/internals.md's module map lists every module of the package and of preprocessing, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _map_entries() -> set[str]:
    text = (ROOT / "docs" / "internals.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    entries, folder = set(), None
    for line in section.splitlines():
        if m := re.match(r"- `([\w/]+)/`$", line):
            folder = m.group(1)
        elif (m := re.match(r"  - `([\w.]+\.py)` — \S", line)) and folder:
            entries.add(f"{folder}/{m.group(1)}")
    return entries


def test_module_map_lists_every_module_and_no_stale_one() -> None:
    modules = {p.relative_to(ROOT).as_posix() for pkg in ("wsi_ncmi", "preprocessing")
               for p in (ROOT / pkg).rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    entries = _map_entries()
    assert not modules - entries, f"missing from the module map in docs/internals.md: {sorted(modules - entries)}"
    assert not entries - modules, f"in the module map but not in the tree: {sorted(entries - modules)}"
