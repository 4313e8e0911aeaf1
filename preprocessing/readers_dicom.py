"""DICOM WSI: a folder of DICOM instances (one per pyramid level, plus label / overview / thumbnail) is one
slide, read through OpenSlide (>= 4 reads DICOM WSI: JPEG, JPEG 2000 and uncompressed frames).

The slide id is the folder's name. Which files count is decided from their first bytes, without a DICOM
library: the SOP class of the file meta (VL Whole Slide Microscopy Image Storage) and the dataset's
ImageType (VOLUME, LABEL, OVERVIEW, THUMBNAIL). Other ``.dcm`` files in the folder (a CT image, a report) are
ignored; a folder with whole-slide instances but no VOLUME (a lone label) is not a slide. OpenSlide opens the
series of the largest VOLUME instance; a folder holding instances of two series is refused (one folder, one
slide). mpp comes from the level-0 PixelSpacing (``openslide.mpp-x/y``, see :mod:`preprocessing.mpp`);
levels are the VOLUME instances.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .readers import OpenSlideReader, UnreadableSlideError

log = logging.getLogger(__name__)

__all__ = ["WSI_SOP_CLASS", "DicomHeader", "read_header", "DicomReader"]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNPARSED_TS = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")  # deflated, big endian: ImageType unknown
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_HEAD_BYTES = 16384  # the file meta and the first dataset elements fit in this


@dataclass(frozen=True)
class DicomHeader:
    """What discovery needs of one DICOM file."""

    sop_class: str
    image_type: tuple[str, ...]  # e.g. ("ORIGINAL", "PRIMARY", "VOLUME", "NONE"); () when unknown

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == WSI_SOP_CLASS

    @property
    def is_volume(self) -> bool:
        """A pyramid level (or an instance whose type could not be read, given the benefit of the doubt)."""
        return self.is_wsi and (len(self.image_type) < 3 or self.image_type[2] == "VOLUME")


def _element(head: bytes, pos: int, explicit: bool) -> tuple[int, int, int, int] | None:
    """(group, element, value start, value length) of the element at ``pos``; None past the bytes read."""
    if pos + 8 > len(head):
        return None
    group, elem = struct.unpack_from("<HH", head, pos)
    if not explicit:
        return group, elem, pos + 8, struct.unpack_from("<I", head, pos + 4)[0]
    if head[pos + 4:pos + 6] in _LONG_VRS:
        if pos + 12 > len(head):
            return None
        return group, elem, pos + 12, struct.unpack_from("<I", head, pos + 8)[0]
    return group, elem, pos + 8, struct.unpack_from("<H", head, pos + 6)[0]


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace").strip()


def read_header(path: Path) -> DicomHeader | None:
    """SOP class and ImageType of a DICOM Part-10 file from its first bytes; None when it is not one.

    The file meta group is explicit VR little endian by the standard; in the dataset, ImageType (0008,0008)
    comes after at most a few short elements (never a sequence), so no general parser is needed.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as e:
        log.warning("%s: cannot read: %s", path, e.strerror or e)
        return None
    if head[128:132] != b"DICM":
        return None
    meta: dict[int, bytes] = {}
    pos = 132
    while (el := _element(head, pos, explicit=True)) is not None and el[0] == 0x0002:
        meta[el[1]] = head[el[2]:el[2] + el[3]]
        pos = el[2] + el[3]
    sop, ts = _text(meta.get(0x0002, b"")), _text(meta.get(0x0010, b""))
    if ts in _UNPARSED_TS:
        return DicomHeader(sop, ())
    while (el := _element(head, pos, explicit=ts != _IMPLICIT_LE)) is not None:
        group, elem, start, length = el
        if (group, elem) > (0x0008, 0x0008) or length == 0xFFFFFFFF:
            break
        if (group, elem) == (0x0008, 0x0008):
            return DicomHeader(sop, tuple(v.strip().upper() for v in _text(head[start:start + length]).split("\\")))
        pos = start + length
    return DicomHeader(sop, ())


def _headers(folder: Path, names: list[str]) -> dict[Path, DicomHeader]:
    out = {}
    for name in names:
        h = read_header(folder / name)
        if h is not None:
            out[folder / name] = h
    return out


class DicomReader(OpenSlideReader):
    """A DICOM WSI folder through OpenSlide; ``path`` is the folder (messages name it)."""

    @classmethod
    def is_slide_folder(cls, folder: Path, names: list[str]) -> bool:
        """True when the ``.dcm`` files ``names`` of ``folder`` include a whole-slide VOLUME instance."""
        headers = _headers(folder, names)
        other = len(names) - sum(h.is_wsi for h in headers.values())
        if other:
            log.info("%s: ignoring %d .dcm file(s) that are not whole-slide images", folder, other)
        if any(h.is_volume for h in headers.values()):
            return True
        if headers and any(h.is_wsi for h in headers.values()):
            log.warning("%s: not a slide: its whole-slide DICOM instances are only %s (no VOLUME)", folder,
                        ", ".join(sorted({h.image_type[2] for h in headers.values() if h.is_wsi})))
        return False

    def __init__(self, path: str | Path, mpp: float | None = None, fast: bool = False):
        folder = Path(path)
        try:
            names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".dcm") and (folder / n).is_file())
            volumes = [p for p, h in _headers(folder, names).items() if h.is_volume]
            sizes = {p: p.stat().st_size for p in volumes}
        except OSError as e:
            raise UnreadableSlideError(f"{folder}: cannot read the folder: {e.strerror or e}") from None
        if not volumes:
            raise UnreadableSlideError(f"{folder}: no whole-slide DICOM VOLUME instance among its {len(names)} "
                                       ".dcm file(s)")
        self._entry = max(volumes, key=lambda p: (sizes[p], p.name))  # level 0, usually
        super().__init__(self._entry, mpp=mpp, fast=False)
        self.path = folder
        vendor = self.properties.get("openslide.vendor")
        if vendor != "dicom":
            self.close()
            raise UnreadableSlideError(f"{folder}: OpenSlide reads {self._entry.name} as {vendor!r}, not DICOM")
        if len(volumes) > self.level_count:  # more level files than levels: another series, or concatenations
            self._check_one_series(folder, volumes)

    def _check_one_series(self, folder: Path, volumes: list[Path]) -> None:
        import openslide

        series = set()
        for p in volumes:
            try:
                with openslide.OpenSlide(str(p)) as s:
                    series.add(s.properties.get("dicom.SeriesInstanceUID", ""))
            except (openslide.OpenSlideError, OSError) as e:
                log.warning("%s: %s: not readable by OpenSlide: %s", folder, p.name, e)
        if len(series) > 1:
            self.close()
            raise UnreadableSlideError(f"{folder}: holds instances of {len(series)} DICOM series (slides); put each "
                                       "series in a folder of its own (one folder is one slide)")

    def _open(self):
        import openslide

        if int(openslide.__library_version__.split(".")[0]) < 4:
            raise UnreadableSlideError(f"{self._entry.parent}: DICOM WSI needs OpenSlide >= 4, this is "
                                       f"{openslide.__library_version__}; pip install -U openslide-bin")
        try:
            return openslide.OpenSlide(str(self._entry))
        except (openslide.OpenSlideError, OSError) as e:
            raise UnreadableSlideError(f"{self._entry.parent}: OpenSlide cannot open the DICOM WSI "
                                       f"({self._entry.name}): {e}") from e
