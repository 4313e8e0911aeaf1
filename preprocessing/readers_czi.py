"""Zeiss CZI through pylibCZIrw (Zeiss's libCZI wrapper; the ``[czi]`` extra). Without it, opening a
``.czi`` says which extra to install, or how to convert the file.

The slide is the whole mosaic (all scenes, white where none was scanned), 8-bit RGB (``Bgr24`` pixels)
only. mpp comes from the metadata's ``Scaling/Items/Distance`` X and Y (metres per pixel, see
:mod:`preprocessing.mpp`). Levels are offered at downsamples 1, 4, 16, ... (while the short side keeps >= 256 px); libCZI
serves a level read from the file's own pyramid subblocks (``zoom``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .readers import StoredLevelsReader, TileReadError, UnreadableSlideError

log = logging.getLogger(__name__)

__all__ = ["CziReader", "CZI_EXTRA_HINT", "czi_properties"]

CZI_EXTRA_HINT = ("install the CZI reader: pip install 'wsi_ncmi[czi]' (pylibCZIrw), or convert the slide to "
                  "OME-TIFF (e.g. bfconvert from Bio-Formats, or QuPath's OME-TIFF export)")
_LEVEL_STEP, _MIN_LEVEL_SIDE = 4, 256


def czi_properties(metadata: dict[str, Any]) -> dict[str, str]:
    """``czi.ScalingX/Y`` (metres per pixel) and ``czi.NominalMagnification`` from the parsed metadata."""
    out: dict[str, str] = {}
    meta = (metadata or {}).get("ImageDocument", {}).get("Metadata", {}) or {}
    items = ((meta.get("Scaling") or {}).get("Items") or {}).get("Distance") or []
    for d in items if isinstance(items, list) else [items]:
        if isinstance(d, dict) and d.get("@Id") in ("X", "Y") and d.get("Value") is not None:
            out[f"czi.Scaling{d['@Id']}"] = str(d["Value"])
    objectives = ((meta.get("Information") or {}).get("Instrument") or {}).get("Objectives") or {}
    obj = objectives.get("Objective") if isinstance(objectives, dict) else None
    obj = obj[0] if isinstance(obj, list) and obj else obj
    if isinstance(obj, dict) and obj.get("NominalMagnification") is not None:
        out["czi.NominalMagnification"] = str(obj["NominalMagnification"])
    return out


class CziReader(StoredLevelsReader):
    """A CZI mosaic as a slide with virtual levels; region reads through libCZI."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        try:
            from pylibCZIrw import czi as pyczi
        except ImportError:
            raise UnreadableSlideError(f"{self.path}: CZI is recognised but its reader is missing; {CZI_EXTRA_HINT}") from None
        try:
            self._czi = pyczi.CziReader(str(self.path))
        except Exception as e:  # libCZI raises RuntimeError and others for a broken file
            raise UnreadableSlideError(f"{self.path}: cannot open as CZI: {e}") from e
        try:
            self._setup(mpp)
        except Exception:
            self._czi.close()
            raise

    def _setup(self, mpp: float | None) -> None:
        types = set(self._czi.pixel_types.values())
        if types != {"Bgr24"}:
            raise UnreadableSlideError(f"{self.path}: CZI pixels are {sorted(types)}, only 8-bit RGB (Bgr24) slides "
                                       "are supported")
        rect = self._czi.total_bounding_rectangle
        self._origin = (int(rect.x), int(rect.y))
        w, h = int(rect.w), int(rect.h)
        dims, downs, ds = [(w, h)], [1.0], _LEVEL_STEP
        while min(w, h) / ds >= _MIN_LEVEL_SIDE:
            dims.append((max(1, round(w / ds)), max(1, round(h / ds))))
            downs.append(float(ds))
            ds *= _LEVEL_STEP
        self._dims, self._downs = tuple(dims), tuple(downs)
        self.set_metadata(czi_properties(self._czi.metadata), mpp, "czi.NominalMagnification")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self._downs[level]
        w, h = int(size[0]), int(size[1])
        roi = (self._origin[0] + int(location[0]), self._origin[1] + int(location[1]),
               max(1, round(w * ds)), max(1, round(h * ds)))
        try:
            bgr = self._czi.read(roi=roi, zoom=1.0 / ds, background_pixel=(1.0, 1.0, 1.0))  # [h', w', 3] BGR
        except Exception as e:  # libCZI: RuntimeError on a bad subblock
            raise TileReadError(f"{self.path}: region {location} level {level} size {size}: {e}") from e
        rgb = np.ascontiguousarray(np.asarray(bgr)[..., ::-1])
        if rgb.shape[:2] != (h, w):  # libCZI's zoomed size can differ by a pixel
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        return rgb

    def close(self) -> None:
        self._czi.close()
