"""Tissue segmentation on a low-resolution thumbnail (CLAM-style) and per-tile tissue fractions.

Steps on a thumbnail at ``seg_mpp`` µm/px (default 8): HSV saturation → median blur → threshold
(Otsu, or a fixed value) → morphological close → keep foreground contours with area ≥ ``min_area_um2``,
drop holes smaller than ``min_hole_area_um2`` (filled) → binary mask. Areas are given in µm² so the
settings mean the same at any slide resolution.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["TissueParams", "TissueMask", "segment_tissue", "tile_fractions", "draw_overview"]


@dataclass(frozen=True)
class TissueParams:
    """Segmentation settings (all physical sizes in µm)."""

    seg_mpp: float = 8.0  # thumbnail resolution, µm/px (CLAM segments at ~8–16 µm/px)
    method: str = "otsu"  # "otsu" | "fixed"
    threshold: int = 8  # saturation threshold for "fixed" (0–255); lower bound for "otsu"
    median_um: float = 56.0  # median blur window (7 px at 8 µm/px)
    close_um: float = 32.0  # morphological close kernel
    min_area_um2: float = 0.01e6  # smallest tissue piece kept (0.01 mm²)
    min_hole_area_um2: float = 0.005e6  # holes smaller than this are filled

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    """A binary tissue mask at ``downsample`` level-0 px per mask px, with its outer contours."""

    mask: np.ndarray  # [h, w] uint8 {0, 1}
    downsample: float  # level-0 pixels per mask pixel
    contours: list[np.ndarray]  # each [K, 1, 2] int32, mask coordinates
    threshold: float  # the saturation threshold used

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _threshold(sat: np.ndarray, p: TissueParams) -> float:
    if p.method == "fixed":
        return float(p.threshold)
    if p.method == "otsu":
        t, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # a blank slide has only glass noise: Otsu would split the noise, the floor keeps it empty
        return max(float(t), float(p.threshold))
    raise ValueError(f"tissue method must be 'otsu' or 'fixed', got {p.method!r}")


def segment_tissue(rgb: np.ndarray, downsample: float, slide_mpp: float, params: TissueParams) -> TissueMask:
    """Segment tissue on a thumbnail ``rgb`` [h, w, 3] uint8 taken at ``downsample`` of level 0."""
    px_um = slide_mpp * downsample  # µm per thumbnail pixel
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), min(_odd(params.median_um / px_um), 255))
    t = _threshold(sat, params)
    binary = (sat > t).astype(np.uint8)
    k = _odd(params.close_um / px_um)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    mask = np.zeros_like(binary)
    kept: list[np.ndarray] = []
    if hierarchy is not None:
        min_area = params.min_area_um2 / px_um**2
        min_hole = params.min_hole_area_um2 / px_um**2
        hier = hierarchy[0]  # [K, 4]: next, prev, first child, parent
        for i, c in enumerate(contours):
            if hier[i][3] != -1 or cv2.contourArea(c) < min_area:
                continue
            kept.append(c)
            cv2.drawContours(mask, [c], -1, 1, thickness=cv2.FILLED)
            child = hier[i][2]
            while child != -1:  # holes of this piece: keep the big ones as background
                if cv2.contourArea(contours[child]) >= min_hole:
                    cv2.drawContours(mask, [contours[child]], -1, 0, thickness=cv2.FILLED)
                child = hier[child][0]
    return TissueMask(mask=mask, downsample=float(downsample), contours=kept, threshold=t)


def tile_fractions(tm: TissueMask, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Tissue fraction of each tile: coords [N, 2] level-0 top-left, square side ``size_level0`` → [N]."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    integral = cv2.integral(tm.mask, sdepth=cv2.CV_64F)  # [h+1, w+1]
    h, w = tm.mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / tm.downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / tm.downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / tm.downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / tm.downsample).astype(np.int64), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / area).astype(np.float32)


def draw_overview(rgb: np.ndarray, tm: TissueMask, coords: np.ndarray, size_level0: float,
                  max_side: int = 2048) -> np.ndarray:
    """The thumbnail with tissue contours (green) and kept tiles (blue boxes): [h, w, 3] uint8."""
    img = rgb.copy()
    scale = 1.0
    if max(img.shape[:2]) > max_side:
        scale = max_side / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    f = scale / tm.downsample  # level-0 px -> overview px
    cs = [np.round(c * scale).astype(np.int32) for c in tm.contours]
    cv2.drawContours(img, cs, -1, (0, 200, 0), thickness=2)
    s = max(1, int(round(size_level0 * f)))
    for x, y in coords:
        p0 = (int(x * f), int(y * f))
        cv2.rectangle(img, p0, (p0[0] + s - 1, p0[1] + s - 1), (30, 60, 220), thickness=1)
    return img
