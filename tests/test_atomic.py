"""Atomic output: the target is either the old or the complete new file, and no temporary file is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text


def test_atomic_write_text_replaces_and_leaves_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    assert atomic_write_text(target, "one\r\n") == target
    atomic_write_text(target, "two\n")
    assert target.read_bytes() == b"two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "fig.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
