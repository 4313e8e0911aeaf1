"""Where a slide's physical pixel size (mpp, µm per level-0 pixel) comes from, and which values to believe.

In order: an explicit override (``--mpp-csv``, applied by the readers), OpenSlide's ``openslide.mpp-x/y``,
vendor keys (``aperio.MPP``, Hamamatsu/Philips/Leica keys), a physical pixel size with its unit (DICOM
PixelSpacing in mm, OME ``PhysicalSizeX/Y`` + ``PhysicalSizeXUnit``, CZI scaling in m), the TIFF XResolution + ResolutionUnit
(centimetre or inch; NONE means unknown). It is never guessed: a slide without one has ``mpp = None`` and
the pipeline reports ``mpp_missing``. A value from the file outside ``PLAUSIBLE_MPP`` (e.g. the 72 dpi =
352.8 µm/px many writers put in every TIFF) is rejected as if absent (logged, and named in the
``mpp_missing`` message); an ``--mpp-csv`` value is the user's and is used as is.

``tiff_resolution_properties`` reads a plain TIFF's resolution tags under OpenSlide's property names, so
the same rules serve files OpenSlide cannot open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "LENGTH_UNITS_UM",
    "MPP_RULES",
    "PLAUSIBLE_MPP",
    "magnification_from_properties",
    "mpp_from_properties",
    "plausible_mpp",
    "tiff_resolution_properties",
]

# µm per pixel a slide's level 0 can plausibly have (scanners: ~0.1-1; low-power scans a few µm)
PLAUSIBLE_MPP = (0.05, 20.0)


def plausible_mpp(v: float | None) -> bool:
    return v is not None and PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1]


def _positive(v: str | None) -> float | None:
    try:
        f = float(v) if v is not None else None
    except ValueError:
        return None
    return f if f is not None and np.isfinite(f) and f > 0 else None


def _mpp_openslide(p: Mapping[str, str]) -> float | None:
    x, y = _positive(p.get("openslide.mpp-x")), _positive(p.get("openslide.mpp-y"))
    if x and y:
        return (x + y) / 2
    return x or y


def _mpp_aperio(p: Mapping[str, str]) -> float | None:
    return _positive(p.get("aperio.MPP"))


def _mpp_vendor_resolution(p: Mapping[str, str]) -> float | None:
    # OpenSlide already derives openslide.mpp-* for these vendors; kept for files where it does not.
    for key in ("philips.DICOM_PIXEL_SPACING",):
        if key in p:
            try:
                first = float(p[key].strip('"').split()[0].strip('"'))
                return _positive(str(first * 1000.0))  # mm -> µm
            except (ValueError, IndexError):
                pass
    for key in ("ventana.ScanRes",):
        if (v := _positive(p.get(key))) is not None:
            return v
    return None


# length units of a physical pixel size -> µm (OME's UnitsLength symbols; µ written as micro sign or Greek mu)
LENGTH_UNITS_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4,
                   "m": 1e6, "in": 25400.0}
# property -> (its unit, or the property naming the unit) of the physical pixel size rules, x first then y
_PHYSICAL = (
    ("dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]", "mm"),
    ("dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]", "mm"),
    ("ome.PhysicalSizeX", "ome.PhysicalSizeXUnit"),
    ("ome.PhysicalSizeY", "ome.PhysicalSizeYUnit"),
    ("czi.ScalingX", "m"),
    ("czi.ScalingY", "m"),
)


def _mpp_physical_size(p: Mapping[str, str]) -> float | None:
    """µm per pixel from a size with a unit (DICOM PixelSpacing, OME PhysicalSize, CZI scaling): the mean of
    x and y; an unknown unit gives nothing (OME's default unit is µm)."""
    for (kx, ux), (ky, uy) in zip(_PHYSICAL[::2], _PHYSICAL[1::2]):
        got = []
        for key, unit in ((kx, ux), (ky, uy)):
            name = unit if unit in LENGTH_UNITS_UM else p.get(unit, "µm").strip()
            if (v := _positive(p.get(key))) is not None and name in LENGTH_UNITS_UM:
                got.append(v * LENGTH_UNITS_UM[name])
        if got:
            return sum(got) / len(got)
    return None


_UNIT_UM = {"centimeter": 1e4, "centimetre": 1e4, "inch": 25400.0, "cm": 1e4}


def _mpp_tiff(p: Mapping[str, str]) -> float | None:
    unit = str(p.get("tiff.ResolutionUnit", "")).strip().lower()
    if unit not in _UNIT_UM:  # NONE (or absent) means the resolution carries no physical size
        return None
    x, y = _positive(p.get("tiff.XResolution")), _positive(p.get("tiff.YResolution"))
    res = [r for r in (x, y) if r]
    if not res:
        return None
    return _UNIT_UM[unit] / (sum(res) / len(res))


# first hit wins
MPP_RULES: tuple[Callable[[Mapping[str, str]], float | None], ...] = (
    _mpp_openslide,
    _mpp_aperio,
    _mpp_vendor_resolution,
    _mpp_physical_size,
    _mpp_tiff,
)


def mpp_from_properties(properties: Mapping[str, str], rejected: list[str] | None = None) -> float | None:
    """µm per level-0 pixel from slide properties, or None (never guessed).

    The first rule giving a value inside ``PLAUSIBLE_MPP`` wins; implausible values are logged and, when
    ``rejected`` is given, described there ("352.8 µm/px from _mpp_tiff").
    """
    for rule in MPP_RULES:
        if (v := rule(properties)) is not None:
            if plausible_mpp(v):
                return float(v)
            what = f"{v:.4g} µm/px from {rule.__name__.removeprefix('_mpp_')} (outside {PLAUSIBLE_MPP})"
            log.warning("ignoring implausible mpp %s", what)
            if rejected is not None:
                rejected.append(what)
    return None


def magnification_from_properties(properties: Mapping[str, str]) -> float | None:
    """Objective power of level 0 from slide properties, or None."""
    for key in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens"):
        if (v := _positive(properties.get(key))) is not None:
            return v
    return None


_TIFF_UNITS = {1: "none", 2: "inch", 3: "centimeter"}


def tiff_resolution_properties(path: Path) -> dict[str, str]:
    """The first page's resolution tags in OpenSlide's property names (``tiff.XResolution`` ...)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            out: dict[str, str] = {}
            for name in ("XResolution", "YResolution"):
                if name in tags:
                    num, den = tags[name].value
                    out[f"tiff.{name}"] = str(num / den) if den else "0"
            if "ResolutionUnit" in tags:
                out["tiff.ResolutionUnit"] = _TIFF_UNITS.get(int(tags["ResolutionUnit"].value), "none")
            return out
    except Exception as e:  # noqa: BLE001 - the tags are optional; tifffile raises many types
        log.debug("%s: no TIFF resolution tags: %s", path, e)
        return {}
