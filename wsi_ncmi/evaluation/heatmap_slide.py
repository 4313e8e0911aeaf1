"""Putting a bag back on its slide for a heatmap: the pixel size the bag records, the check that the bag was
extracted from this slide, and the slide thumbnail the scores are drawn on.

The slide is any ``preprocessing.readers`` reader (duck-typed: ``dimensions``, ``level_count``,
``level_dimensions``, ``read_region``, ``read_level_scaled``, ``mpp``, ``path``); this module does not import
``preprocessing`` (the command opens the slide and names its id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .heatmap import HeatmapError, check_thumbnail_size

__all__ = ["check_bag_matches_slide", "read_slide_thumbnail", "recorded_mpp"]


def recorded_mpp(bag: Any) -> float | None:
    """The slide mpp the bag was extracted with (``slide_mpp`` root attribute), or None (e.g. CLAM files)."""
    try:
        value = float(bag.attrs.get("slide_mpp"))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def check_bag_matches_slide(bag: Any, slide: Path, slide_id: str, dimensions: tuple[int, int],
                            patch_size_level0: float, source_size: int) -> None:
    """Raise ``HeatmapError`` when the bag was not extracted from ``slide`` (whose id and source size, as
    preprocessing computes them, are ``slide_id`` and ``source_size``: a file's bytes, a slide folder's summed
    file bytes): another ``slide_id``, another recorded ``source_size``, or tiles outside the slide's level-0
    ``dimensions``."""
    problems = []
    if str(bag.slide_id) != slide_id:
        problems.append(f"its slide_id is {bag.slide_id!r}, the slide's is {slide_id!r}")
    size = bag.attrs.get("source_size")
    if size is not None and int(size) > 0 and int(size) != source_size:
        problems.append(f"it records a source of {int(size)} bytes, the slide has {source_size}")
    coords = np.asarray(bag.coords).reshape(-1, 2)  # [N, 2] level-0 (x, y)
    w0, h0 = dimensions
    outside = int(((coords[:, 0] >= w0) | (coords[:, 1] >= h0) | (coords + patch_size_level0 <= 0).any(1)).sum())
    if outside:
        problems.append(f"{outside} of {len(coords)} tiles lie outside the slide's {w0}x{h0} px")
    if problems:
        source = bag.attrs.get("source_path")
        raise HeatmapError(
            f"--bag {bag.path} does not belong to --slide {slide}"
            f"{f' (it was extracted from {source})' if source else ''}: {'; '.join(problems)}; "
            "pass the slide's own bag, or --allow-slide-mismatch to draw it anyway"
        )


def read_slide_thumbnail(reader: Any, mpp: float | None = None, level: int | None = None,
                         max_side: int = 2048) -> tuple[np.ndarray, float]:
    """``(rgb [h, w, 3] uint8, level-0 px per thumbnail px)`` of a ``preprocessing.readers`` slide: one whole
    pyramid ``level``, or resampled to ``mpp`` µm/px (``reader.mpp`` must be known) or to ``max_side`` px."""
    w0, h0 = reader.dimensions
    if level is not None:
        if not 0 <= level < reader.level_count:
            raise HeatmapError(f"--level {level}: {reader.path} has levels 0..{reader.level_count - 1}")
        w, h = reader.level_dimensions[level]
        check_thumbnail_size(reader.path, w, h)
        return reader.read_region((0, 0), level, (w, h)), w0 / w
    if mpp is not None:
        if mpp <= 0:
            raise HeatmapError(f"--mpp must be positive, got {mpp}")
        if reader.mpp is None:
            rejected = getattr(reader, "mpp_rejected", "")
            raise HeatmapError(f"--mpp {mpp}: {reader.path} has no pixel size (mpp)"
                               f"{'; rejected ' + rejected if rejected else ''} and the bag records none; "
                               "use --level or --max-side")
        ds = float(mpp) / float(reader.mpp)
    else:
        ds = max(1.0, max(w0, h0) / max(1, max_side))
    check_thumbnail_size(reader.path, max(1, round(w0 / ds)), max(1, round(h0 / ds)))
    rgb, exact, _ = reader.read_level_scaled(ds)  # unreadable pieces stay white (logged by the reader)
    return rgb, exact
