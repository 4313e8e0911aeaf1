"""Tiles of ``patch_size`` px at exactly ``target_mpp`` µm/px: the reading plan and the tile grid.

The plan reads each tile from the coarsest pyramid level whose mpp is at most ``target_mpp * (1 + tol)``
(so a tile is never upsampled beyond the tolerance), reads ``read_size`` px there and resizes to
``patch_size``. ``read_size = round(patch_size * target_mpp / level_mpp)``, hence the output pixel size
``effective_mpp = level_mpp * read_size / patch_size`` is within half a level pixel of the target.
Coordinates are level-0 top-left corners of tiles that lie entirely inside the slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from wsi_ncmi.errors import UserError

__all__ = ["TilePlan", "MppTooCoarseError", "EffectiveMppError", "plan_tiles", "grid_coords", "DEFAULT_TOLERANCE"]

DEFAULT_TOLERANCE = 0.05


class MppTooCoarseError(UserError):
    """The slide's pixels are larger than the target pixel size (beyond the tolerance)."""


class EffectiveMppError(UserError):
    """Whole-pixel reads cannot reach the target pixel size within the tolerance (tiny patch sizes)."""


@dataclass(frozen=True)
class TilePlan:
    """How to cut one slide into tiles."""

    level: int  # pyramid level read
    read_size: int  # tile side in pixels at ``level``
    patch_size: int  # output tile side (pixels at effective_mpp)
    patch_size_level0: int  # tile side in level-0 pixels (footprint)
    stride_level0: int  # grid step in level-0 pixels (patch minus overlap)
    slide_mpp: float
    level_mpp: float
    target_mpp: float
    effective_mpp: float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_tiles(
    slide_mpp: float,
    level_downsamples: Sequence[float],
    target_mpp: float,
    patch_size: int,
    overlap: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TilePlan:
    """Choose the level and read size so output pixels are ``target_mpp`` (within ``tolerance``)."""
    if slide_mpp is None or slide_mpp <= 0:
        raise ValueError(f"slide mpp must be positive, got {slide_mpp}")
    if target_mpp <= 0 or patch_size <= 0:
        raise ValueError(f"target mpp and patch size must be positive, got {target_mpp}, {patch_size}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size={patch_size}), got {overlap}")
    limit = target_mpp * (1 + tolerance)
    if slide_mpp > limit:
        raise MppTooCoarseError(
            f"slide mpp {slide_mpp:.4g} is coarser than target {target_mpp:.4g} µm/px "
            f"(tolerance {tolerance:.0%}); tiles would be upsampled. Use --target-mpp >= {slide_mpp:.4g}"
        )
    ok = [i for i, d in enumerate(level_downsamples) if slide_mpp * d <= limit]
    level = max(ok, key=lambda i: level_downsamples[i])
    ds = float(level_downsamples[level])
    level_mpp = slide_mpp * ds
    read_size = max(1, int(round(patch_size * target_mpp / level_mpp)))
    effective = level_mpp * read_size / patch_size
    if abs(effective - target_mpp) > tolerance * target_mpp + 1e-12:
        raise EffectiveMppError(
            f"tiles of {patch_size} px read as {read_size} px at {level_mpp:.4g} µm/px come out at "
            f"{effective:.4g} µm/px, more than {tolerance:.0%} from the target {target_mpp:.4g}; use a larger "
            "--patch-size or a larger --mpp-tolerance"
        )
    scale0 = read_size * ds / patch_size  # level-0 px per output px
    return TilePlan(
        level=level,
        read_size=read_size,
        patch_size=int(patch_size),
        patch_size_level0=int(round(patch_size * scale0)),
        stride_level0=max(1, int(round((patch_size - overlap) * scale0))),
        slide_mpp=float(slide_mpp),
        level_mpp=level_mpp,
        target_mpp=float(target_mpp),
        effective_mpp=float(effective),
    )


def grid_coords(width: int, height: int, plan: TilePlan) -> np.ndarray:
    """Level-0 top-left corners [N, 2] int64 (x, y) of every grid tile fully inside the slide, row-major.

    The tile's footprint at its level must also fit that level's extent: ``x + patch_size_level0 <= width``.
    """
    s, p = plan.stride_level0, plan.patch_size_level0
    if width < p or height < p:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, width - p + 1, s, dtype=np.int64)
    ys = np.arange(0, height - p + 1, s, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)
