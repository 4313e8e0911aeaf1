"""Slide readers: one interface over OpenSlide formats and plain images, chosen by file extension.

``open_slide(path, mpp=None)`` picks a reader by file extension (``READERS``). ``mpp`` (µm per level-0
pixel) overrides the file's (``--mpp-csv``); otherwise a reader takes it from the file's properties by
the rules of :mod:`preprocessing.mpp` (never guessed; implausible values rejected, named in
``mpp_rejected``).

``.tif``/``.tiff`` files that OpenSlide cannot open (plain stripped TIFFs) are read whole by
:class:`TiffImageReader` (one level; mpp from ``--mpp-csv`` or a plausible TIFF resolution).

Readers in modules of their own (``MODULE_READERS``: OME-TIFF, CZI; ``FOLDER_READERS``: a DICOM WSI folder
is one slide) build on the classes here, so they are imported when first needed.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

from wsi_ncmi.errors import UserError

from .file_checks import MAX_DECODE_PIXELS, declared_image_size, unreadable_reason
from .mpp import magnification_from_properties, mpp_from_properties, tiff_resolution_properties
from .tiff_tiles import TiffLevels, TileDecodeError

log = logging.getLogger(__name__)

__all__ = [
    "SlideError",
    "UnreadableSlideError",
    "TileReadError",
    "SlideReader",
    "OpenSlideReader",
    "StoredLevelsReader",
    "ImageReader",
    "READERS",
    "SLIDE_EXTENSIONS",
    "open_slide",
    "IMAGE_EXTENSIONS",
    "slide_id_of",
    "TiffImageReader",
    "FALLBACK_READERS",
    "MODULE_READERS",
    "FOLDER_READERS",
    "reader_class",
    "load_reader",
]

class SlideError(UserError):
    """A slide cannot be used; the message names the file."""


class UnreadableSlideError(SlideError):
    """The file cannot be opened as a slide (corrupt, truncated, unsupported)."""


class TileReadError(SlideError):
    """One region of an otherwise readable slide failed to decode."""


class SlideReader(ABC):
    """A pyramidal slide: level geometry, mpp, region reads as RGB uint8.

    Coordinates passed to :meth:`read_region` are level-0 (x, y); ``size`` is (w, h) at ``level``.
    """

    path: Path
    mpp: float | None  # µm per level-0 pixel, None when unknown
    magnification: float | None  # objective power of level 0, None when unknown

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """[h, w, 3] uint8 RGB; transparent (unscanned) pixels are white. Raises TileReadError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def region_is_empty(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> bool:
        """True when the file holds no image data for this region (never-written tiles of a sparse TIFF),
        which reads as white: the thumbnail skips it without decoding. False when unknown."""
        return False

    def read_level_scaled(self, downsample: float, block: int = 2048) -> tuple[np.ndarray, float, np.ndarray]:
        """The whole slide at ~``downsample`` (level-0 px per output px), read block by block.

        Returns ``(rgb [h, w, 3] uint8, exact downsample, failed [h, w] bool)``. Uses the coarsest level not
        coarser than the request. Memory stays bounded by the output size plus one block whatever the level's
        declared size: a level up to 4096² px is read whole and resized once; a larger one block by block, each
        block resized into its place in the output (progress is logged). Regions without image data (sparse
        tiles) are white without being read. A block that fails to decode is retried in 256-px pieces; pieces
        that still fail are left white and marked in ``failed`` (the pipeline still tries the tiles there, so
        they are counted as bad, never dropped silently).
        """
        downs = self.level_downsamples
        level = max((i for i, d in enumerate(downs) if d <= downsample * 1.001), default=0)
        lw, lh = self.level_dimensions[level]
        ds = downs[level]
        w0, h0 = self.dimensions
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        full = np.full((lh, lw, 3), 255, np.uint8) if lw * lh <= 4096 * 4096 else None
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        bad = np.zeros((out_h, out_w), bool)
        sx, sy = out_w / lw, out_h / lh
        if full is None:  # every block must cover at least ~2 output pixels each way
            block = max(block, int(np.ceil(2 / min(sx, sy))))
        n_blocks = -(-lw // block) * -(-lh // block)
        report = full is None and n_blocks >= 64  # progress every 10%
        next_pct = 10
        if report:
            log.info("%s: reading the segmentation thumbnail from level %d (%d x %d px) in %d blocks",
                     self.path, level, lw, lh, n_blocks)
        failed, done, t0 = 0, 0, time.monotonic()
        for y in range(0, lh, block):
            hh = min(block, lh - y)
            oy0, oy1 = round(y * sy), round((y + hh) * sy)
            for x in range(0, lw, block):
                ww = min(block, lw - x)
                buf = full[y:y + hh, x:x + ww] if full is not None else None
                if self.region_is_empty((round(x * ds), round(y * ds)), level, (ww, hh)):
                    pass  # white already
                else:
                    if buf is None:
                        buf = np.full((hh, ww, 3), 255, np.uint8)
                    for bx, by, bw, bh in self._read_block(buf, x, y, level, ds):
                        failed += 1
                        bad[int(by * sy):int(np.ceil((by + bh) * sy)),
                            int(bx * sx):int(np.ceil((bx + bw) * sx))] = True
                    if full is None:
                        ox0, ox1 = round(x * sx), round((x + ww) * sx)
                        if ox1 > ox0 and oy1 > oy0:
                            out[oy0:oy1, ox0:ox1] = cv2.resize(buf, (ox1 - ox0, oy1 - oy0),
                                                               interpolation=cv2.INTER_AREA)
                done += 1
                if report and 100 * done // n_blocks >= next_pct and done < n_blocks:
                    pct = 100 * done // n_blocks
                    log.info("%s: thumbnail %d%% (%d/%d blocks, %.0f s)", self.path, pct, done, n_blocks,
                             time.monotonic() - t0)
                    next_pct = pct // 10 * 10 + 10
        if full is not None:
            out = cv2.resize(full, (out_w, out_h), interpolation=cv2.INTER_AREA)
        if failed:
            log.warning("%s: %d thumbnail piece(s) failed to decode and count as glass", self.path, failed)
        return out, w0 / out_w, bad

    def _read_block(self, buf: np.ndarray, x: int, y: int, level: int, ds: float,
                    piece: int = 256) -> list[tuple[int, int, int, int]]:
        """Fill ``buf`` [hh, ww, 3] with the level region at (x, y); returns the (x, y, w, h) level pieces
        that failed to decode."""
        hh, ww = buf.shape[:2]
        try:
            buf[:] = self.read_region((round(x * ds), round(y * ds)), level, (ww, hh))
            return []
        except TileReadError:
            pass
        failed: list[tuple[int, int, int, int]] = []
        for py in range(0, hh, piece):
            for px in range(0, ww, piece):
                pw, ph = min(piece, ww - px), min(piece, hh - py)
                try:
                    buf[py:py + ph, px:px + pw] = self.read_region(
                        (round((x + px) * ds), round((y + py) * ds)), level, (pw, ph))
                except TileReadError:
                    failed.append((x + px, y + py, pw, ph))
        return failed

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- readers
class StoredLevelsReader(SlideReader):
    """A reader that knows its level geometry up front (``_dims``, ``_downs``) and its metadata as a properties
    dict: the part OpenSlide, OME-TIFF and CZI readers share."""

    _dims: tuple[tuple[int, int], ...]
    _downs: tuple[float, ...]

    def set_metadata(self, properties: dict[str, str], mpp: float | None, magnification_key: str | None = None) -> None:
        """``properties``, ``mpp`` (the override, else by :mod:`preprocessing.mpp`'s rules; implausible values
        named in ``mpp_rejected``) and ``magnification`` (``magnification_key``, else the OpenSlide rules)."""
        self.properties = properties
        rejected: list[str] = []
        self.mpp = float(mpp) if mpp is not None else mpp_from_properties(properties, rejected)
        self.mpp_rejected = "; ".join(rejected)  # implausible values found in the file
        if magnification_key is None:
            self.magnification = magnification_from_properties(properties)
            return
        try:
            mag = float(properties.get(magnification_key, "nan"))
        except ValueError:
            mag = float("nan")
        self.magnification = mag if np.isfinite(mag) and mag > 0 else None

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downs


class OpenSlideReader(StoredLevelsReader):
    """Any format OpenSlide opens (svs, tif, ndpi, mrxs, scn, bif, vms, ...).

    After a failed region read OpenSlide puts the handle in an error state, so the reader reopens the
    file and raises :class:`TileReadError` for that one region.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, fast: bool = True):
        self.path = Path(path)
        self._slide = self._open()
        props = dict(self._slide.properties)
        self.set_metadata(props, mpp)
        self._dims = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self._downs = tuple(float(d) for d in self._slide.level_downsamples)
        # decode TIFF tiles directly where that reproduces OpenSlide's pixels (~4x faster per tile)
        self._fast = TiffLevels.open(self.path, props.get("openslide.vendor"), self._dims, self._downs) \
            if fast else None

    def _open(self):
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as e:
            raise UnreadableSlideError(f"{self.path}: cannot open with OpenSlide: {e}") from e

    def region_is_empty(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> bool:
        return self._fast is not None and self._fast.is_empty(location, level, size)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._fast is not None:
            try:
                out = self._fast.read(location, level, size)
                if out is not None:
                    return out
            except TileDecodeError as e:  # let OpenSlide decide (sparse tiles, its own error)
                log.debug("%s: fast read failed, using OpenSlide: %s", self.path, e)
        return self._read_openslide(location, level, size)

    def read_region_reduced(self, location: tuple[int, int], level: int, size: tuple[int, int],
                            factor: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """The region at 1/``factor`` scale (JPEG tiles decoded in the DCT domain; written into ``out`` when
        given), or None: read it exactly."""
        return None if self._fast is None else self._fast.read_reduced(location, level, size, factor, out)

    def read_region_jpeg(self, location: tuple[int, int], level: int, size: tuple[int, int], out: bytearray,
                         ends: list[int]) -> tuple[int, int, int, int] | None:
        """The region's JPEG tiles, undecoded (``--jpeg-decode device``; :meth:`TiffLevels.jpeg_region`), or None."""
        return None if self._fast is None else self._fast.jpeg_region(location, level, size, out, ends)

    def _read_openslide(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            img = self._slide.read_region((int(location[0]), int(location[1])), int(level),
                                          (int(size[0]), int(size[1])))
        except (openslide.OpenSlideError, OSError) as e:
            try:
                self._slide.close()
            finally:
                self._slide = self._open()
            raise TileReadError(f"{self.path}: region {location} level {level} size {size}: {e}") from e
        rgba = np.asarray(img)  # [h, w, 4], not premultiplied
        if rgba[..., 3].min() == 255:  # fully scanned (the usual case): no compositing needed
            return np.ascontiguousarray(rgba[..., :3])
        alpha = rgba[..., 3:4].astype(np.uint16)
        rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._slide.close()


class ImageReader(SlideReader):
    """Plain images (png, jpg, ...): one level, no embedded mpp (it must come from ``--mpp-csv``)."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        size = declared_image_size(self.path)
        if size is not None and size[0] * size[1] > MAX_DECODE_PIXELS:
            raise UnreadableSlideError(
                f"{self.path}: declares {size[0]} x {size[1]} px, too large to decode whole as a plain image "
                f"(limit {MAX_DECODE_PIXELS} px, about {3 * MAX_DECODE_PIXELS / 2**30:.0f} GiB of RGB); convert it "
                "to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)")
        bgr = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UnreadableSlideError(f"{self.path}: cannot decode the image (corrupt, or larger than OpenCV's "
                                       "decoding limit)")
        self._rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: no second full-size copy
        self.mpp = float(mpp) if mpp is not None else None
        self.mpp_rejected = ""
        self.magnification = None
        self.properties: dict[str, str] = {}

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((self._rgb.shape[1], self._rgb.shape[0]),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level != 0:
            raise TileReadError(f"{self.path}: plain images have one level, asked for level {level}")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image is white glass, as OpenSlide
        H, W = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._rgb[y0:y1, x0:x1]
        return out


class TiffImageReader(ImageReader):
    """A plain (stripped, non-pyramidal) TIFF that OpenSlide does not open, decoded whole into memory.

    mpp: the override (``--mpp-csv``), else a plausible XResolution/ResolutionUnit, else None.
    """

    def __init__(self, path: str | Path, mpp: float | None = None):
        super().__init__(path, mpp)
        if mpp is None:
            props = tiff_resolution_properties(self.path)
            rejected: list[str] = []
            self.mpp = mpp_from_properties(props, rejected)
            self.mpp_rejected = "; ".join(rejected)
            self.properties = props


# extension -> reader class
READERS: dict[str, type[SlideReader]] = {
    **{ext: OpenSlideReader for ext in (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms",
                                         ".vmu", ".svslide")},
    **{ext: ImageReader for ext in (".png", ".jpg", ".jpeg")},
}
# formats whose readers live in modules of their own, imported when first needed: extension -> "module:Class"
MODULE_READERS: dict[str, str] = {".ome.tif": "readers_ome:OmeTiffReader", ".ome.tiff": "readers_ome:OmeTiffReader",
                                  ".czi": "readers_czi:CziReader"}
# a folder holding files of this extension is one slide when the class's is_slide_folder(folder, names) says so
FOLDER_READERS: dict[str, str] = {".dcm": "readers_dicom:DicomReader"}
SLIDE_EXTENSIONS = tuple(READERS) + tuple(MODULE_READERS)
# plain images: taken as slides only when their mpp is given (--mpp-csv) or they are listed in --slides
IMAGE_EXTENSIONS = tuple(ext for ext, cls in READERS.items() if cls is ImageReader)
# extension -> reader tried when the READERS one cannot open the file
FALLBACK_READERS: dict[str, type[SlideReader]] = {".tif": TiffImageReader, ".tiff": TiffImageReader}


def load_reader(spec: str) -> type[SlideReader]:  # "module:Class" of this package
    return getattr(importlib.import_module(f"{__package__}.{spec.split(':')[0]}"), spec.split(":")[1])


def reader_class(path: str | Path) -> tuple[str, type[SlideReader]] | None:
    """(extension, reader) registered for ``path``: a folder's by the extension of its files, a file's by the
    longest registered extension its name ends with (``.ome.tif`` before ``.tif``); None when there is none."""
    path = Path(path)
    if path.is_dir():
        try:
            exts = {os.path.splitext(n)[1].lower() for n in os.listdir(path)}
        except OSError as e:
            raise UnreadableSlideError(f"{path}: cannot list the folder: {e.strerror or e}") from None
        return next(((ext, load_reader(spec)) for ext, spec in FOLDER_READERS.items() if ext in exts), None)
    name = path.name.lower()
    ext = max((e for e in (*READERS, *MODULE_READERS) if name.endswith(e)), key=len, default=None)
    return None if ext is None else (ext, READERS.get(ext) or load_reader(MODULE_READERS[ext]))


def preload_libraries() -> None:
    """Import the slide libraries (OpenSlide, tifffile) in this process, so that the DataLoader workers forked
    from it do not each import them again (~30 ms of CPU per worker). A missing one is left to the readers."""
    import importlib

    for name in ("openslide", "tifffile"):
        try:
            importlib.import_module(name)
        except Exception as e:  # not installed, or libopenslide missing: the readers report it per slide
            log.debug("not preloading %s: %s", name, e)


def open_slide(path: str | Path, mpp: float | None = None) -> SlideReader:
    """Open ``path`` (a file, or a slide folder) with the reader registered for it; ``mpp`` overrides the file's."""
    path = Path(path)
    if (match := reader_class(path)) is None:
        raise SlideError(f"{path}: no reader for extension {path.suffix!r}; known: {', '.join(SLIDE_EXTENSIONS)}, "
                         f"or a folder of {', '.join(FOLDER_READERS)} files")
    ext, cls = match
    if not path.exists():
        raise UnreadableSlideError(f"{path}: no such file")
    if path.is_file() and (why := unreadable_reason(path)):
        raise UnreadableSlideError(why)
    try:
        return cls(path, mpp=mpp)
    except UnreadableSlideError as first:
        fallback = FALLBACK_READERS.get(ext)
        if fallback is None:
            raise
        try:
            reader = fallback(path, mpp=mpp)
        except UnreadableSlideError as second:
            raise UnreadableSlideError(f"{first}; {second}") from first
        log.info("%s: OpenSlide cannot open it; read as a plain image with %s", path, fallback.__name__)
        return reader


def slide_id_of(path: str | Path) -> str:
    """The slide id: a slide folder's name (also for the path of a file in it), else the file name without
    its last extension."""
    p = Path(path)
    if p.suffix.lower() in FOLDER_READERS:
        return p.parent.name
    return p.name if p.is_dir() else p.stem
