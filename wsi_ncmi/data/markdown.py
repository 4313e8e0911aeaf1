"""Markdown tables: the one writer of ``| a | b |`` tables for reports, summaries and READMEs.

A dependency-free leaf of the data layer (like :mod:`wsi_ncmi.data.atomic`), so that every layer above it (the
official split README in ``data``, evaluation reports, the CLIs and the demo) renders tables the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """Lines of a GitHub-flavoured Markdown table: the header, a ``|---|---|`` rule, one line per row.

    Cells are written with ``str`` as they are (no escaping, no padding); callers format numbers first.
    """
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
