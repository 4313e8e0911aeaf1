"""OME-TIFF (``.ome.tif`` / ``.ome.tiff``): pyramids stored as SubIFDs, which OpenSlide does not see (it
reads one level there, without an mpp), read with tifffile.

The slide is the largest 8-bit RGB image of the file (a label or macro image beside it is ignored); its
levels are the image's SubIFD pyramid. mpp comes from the OME-XML ``PhysicalSizeX/Y`` in
``PhysicalSizeXUnit/YUnit`` (µm when absent; nm, mm, ... converted, see :mod:`preprocessing.mpp`),
the objective power from the ``Objective``'s ``NominalMagnification``. Tiled levels are read tile by tile
(:class:`preprocessing.tiff_tiles.TiffLevels`); a small untiled level is decoded whole once.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .readers import StoredLevelsReader, TileReadError, UnreadableSlideError
from .tiff_tiles import TiffLevels, TileDecodeError

log = logging.getLogger(__name__)

__all__ = ["OmeTiffReader", "ome_properties"]

MAX_UNTILED_LEVEL_PX = 4096 * 4096  # an untiled level larger than this is not offered as a level


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_properties(xml: str, image: int = 0) -> dict[str, str]:
    """``ome.PhysicalSizeX`` ... of Image ``image`` (its Pixels element) and ``ome.NominalMagnification`` of
    the first Objective, from the OME-XML text; {} when it does not parse."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        log.warning("OME-XML does not parse (%s); no physical pixel size", e)
        return {}
    pixels = [el for el in root.iter() if _local(el.tag) == "Pixels"]
    out: dict[str, str] = {}
    if pixels:
        px = pixels[image] if image < len(pixels) else pixels[0]
        for key in ("PhysicalSizeX", "PhysicalSizeXUnit", "PhysicalSizeY", "PhysicalSizeYUnit"):
            if key in px.attrib:
                out[f"ome.{key}"] = px.attrib[key]
    objective = next((el for el in root.iter() if _local(el.tag) == "Objective"), None)
    if objective is not None and "NominalMagnification" in objective.attrib:
        out["ome.NominalMagnification"] = objective.attrib["NominalMagnification"]
    return out


class OmeTiffReader(StoredLevelsReader):
    """The largest RGB image of an OME-TIFF with its SubIFD pyramid."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as e:  # tifffile raises many types for a broken file
            raise UnreadableSlideError(f"{self.path}: cannot open as a TIFF: {e}") from e
        try:
            self._setup(mpp)
        except Exception:
            self._tif.close()
            raise

    def _setup(self, mpp: float | None) -> None:
        tif = self._tif
        if not tif.is_ome:
            raise UnreadableSlideError(f"{self.path}: named OME-TIFF but holds no OME-XML; rename it to .tif to read "
                                       "it as a generic TIFF")
        rgb = [(k, s) for k, s in enumerate(tif.series)
               if s.axes == "YXS" and s.shape[-1] == 3 and s.dtype == np.uint8]
        if not rgb:
            kinds = ", ".join(f"{s.axes} {s.dtype}" for s in tif.series)
            raise UnreadableSlideError(f"{self.path}: no 8-bit RGB image (axes YXS) in this OME-TIFF (has {kinds}); "
                                       "only brightfield RGB slides are supported")
        index, series = max(rgb, key=lambda ks: ks[1].shape[0] * ks[1].shape[1])
        h0, w0 = series.levels[0].shape[:2]
        levels = [lv for i, lv in enumerate(series.levels)
                  if i == 0 or lv.keyframe.is_tiled or lv.shape[0] * lv.shape[1] <= MAX_UNTILED_LEVEL_PX]
        self._series_levels = levels
        self._dims = tuple((int(lv.shape[1]), int(lv.shape[0])) for lv in levels)
        self._downs = tuple((w0 / w + h0 / h) / 2 for w, h in self._dims)
        self._tiles = TiffLevels.from_pages(tif, [lv.keyframe for lv in levels], self._downs)
        if not self._tiles.has_level(0) and w0 * h0 > MAX_UNTILED_LEVEL_PX:
            raise UnreadableSlideError(f"{self.path}: level 0 ({w0} x {h0} px) is not tiled 8-bit RGB; convert it "
                                       "to a tiled pyramid (e.g. vips tiffsave --tile --pyramid)")
        self._whole: dict[int, np.ndarray] = {}  # untiled levels, decoded once
        self.set_metadata(ome_properties(tif.ome_metadata or "", index), mpp, "ome.NominalMagnification")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self._downs[level]
        lx, ly = round(location[0] / ds), round(location[1] / ds)  # the level pixel the region starts on
        try:
            if self._tiles.has_level(level):
                out = self._tiles.read((lx * ds, ly * ds), level, size)
                if out is not None:
                    return out
            return self._crop(self._whole_level(level), lx, ly, size)
        except (TileDecodeError, ValueError, OSError) as e:
            raise TileReadError(f"{self.path}: region {location} level {level} size {size}: {e}") from e

    def _whole_level(self, level: int) -> np.ndarray:
        if level not in self._whole:
            self._whole[level] = np.asarray(self._series_levels[level].asarray())  # [h, w, 3] uint8
        return self._whole[level]

    @staticmethod
    def _crop(arr: np.ndarray, x: int, y: int, size: tuple[int, int]) -> np.ndarray:
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image is white glass
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, arr.shape[1]), min(y + h, arr.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = arr[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._whole.clear()
        self._tiles.close()
