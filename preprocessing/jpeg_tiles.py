"""Reduced-size decoding of TIFF JPEG tiles: 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo).

A 40× slide (0.25 µm/px) tiled at 0.5 µm/px reads 4 level-0 pixels per output pixel; decoding each JPEG tile
at half scale (libjpeg-turbo's reduced inverse DCT, which averages each 2×2 block inside the transform)
skips the full-size IDCT, chroma upsampling, colour conversion and the resize. Entropy decoding is not
reduced, so the saving is ~1.4× per tile, not 4×. Pixels differ slightly from "decode full size + INTER_AREA"
(``bench/read_path_diff.py`` measures by how much); :mod:`preprocessing.tiff_tiles` uses this only on the
``--read-path fast`` path.

TIFF JPEG tiles are often abbreviated streams whose tables live in the page's ``JPEGTables`` tag (Aperio):
:func:`tile_stream` splices them in, and adds an Adobe APP14 marker naming the colour transform, because
Aperio often stores RGB (not YCbCr) in JPEG without a JFIF marker, which a standalone decoder would otherwise
take for YCbCr.

Decoders (:data:`DECODERS`, same libjpeg-turbo "islow" transform, same pixels): ``simplejpeg`` (default when
installed: decodes straight to RGB, ~15 % less CPU per tile than OpenCV, whose ``imdecode`` adds ~20 µs of
set-up per call and returns BGR), else ``opencv``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import cv2
import numpy as np

try:
    import simplejpeg as _simplejpeg
except ImportError:  # an install without it: OpenCV decodes (same pixels, more CPU)
    _simplejpeg = None

__all__ = ["DECODERS", "REDUCE_FLAGS", "TileDecoder", "stream_prefix", "tile_stream", "frame_size",
           "decode_reduced", "default_decoder"]

_ORIENT = getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 128)
# reduction factor -> OpenCV imdecode flag (libjpeg-turbo scale_denom)
REDUCE_FLAGS = {1: cv2.IMREAD_COLOR | _ORIENT, 2: cv2.IMREAD_REDUCED_COLOR_2 | _ORIENT,
                4: cv2.IMREAD_REDUCED_COLOR_4 | _ORIENT, 8: cv2.IMREAD_REDUCED_COLOR_8 | _ORIENT}
_SOI = b"\xff\xd8"
_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive Huffman (what libjpeg decodes)


def _adobe(transform: int) -> bytes:
    """An APP14 "Adobe" segment: transform 0 = components are RGB, 1 = YCbCr."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def stream_prefix(tables: bytes | None, rgb: bool) -> bytes:
    """What goes before a tile's data (after its SOI): SOI, an Adobe marker saying whether the components are
    RGB (TIFF photometric RGB) or YCbCr, and the ``JPEGTables`` segments (without their SOI / EOI)."""
    head = b"\xff\xd8" + _adobe(0 if rgb else 1)
    if not tables:
        return head
    if tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9":
        raise ValueError("JPEGTables is not an SOI..EOI stream")
    return head + tables[2:-2]


def tile_stream(data: bytes, tables: bytes | None, rgb: bool, prefix: bytes | None = None) -> bytes:
    """A standalone JPEG stream for one TIFF tile: :func:`stream_prefix` (``prefix`` when already built for
    the page) followed by the tile's own stream minus its SOI."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("tile data does not start with a JPEG SOI marker")
    return (stream_prefix(tables, rgb) if prefix is None else prefix) + data[2:]


def frame_size(stream: bytes) -> tuple[int, int, int]:
    """(height, width, components) from the stream's SOF marker, walking the header segments; raises
    ValueError when there is none (or the frame is not Huffman-coded baseline / progressive)."""
    i, n = 2, len(stream)
    while i + 4 <= n:
        if stream[i] != 0xFF:
            raise ValueError(f"JPEG header: no marker at byte {i}")
        m = stream[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _SOF and i + 10 <= n:
            return (stream[i + 5] << 8) | stream[i + 6], (stream[i + 7] << 8) | stream[i + 8], stream[i + 9]
        if 0xC3 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) or m == 0xDA:
            break  # lossless / arithmetic frame, or scan data before any frame header
        i += 2 + ((stream[i + 2] << 8) | stream[i + 3])
    raise ValueError("JPEG header: no baseline/progressive frame (SOF0-2) marker")


def _frame_error(h: int, w: int, comps: int, shape: tuple[int, int]) -> str:
    return f"JPEG frame {h}x{w}x{comps}, expected {shape[0]}x{shape[1]}x3"


def _decode_simplejpeg(stream: bytes | memoryview, factor: int, shape: tuple[int, int],
                       out: np.ndarray | None) -> np.ndarray:
    h, w, space, _ = _simplejpeg.decode_jpeg_header(stream)  # the frame, read before anything is allocated
    if (h, w) != shape or space not in ("YCbCr", "RGB"):
        raise ValueError(_frame_error(h, w, 1 if space == "Gray" else 4, shape))
    want = (-(-h // factor), -(-w // factor), 3)
    # the smallest libjpeg scale M/8 whose output covers ``want`` is 1/factor; a larger output would not fit
    return _simplejpeg.decode_jpeg(stream, "rgb", min_height=want[0], min_width=want[1],
                                   buffer=np.empty(want, np.uint8) if out is None else out)


def _decode_opencv(stream: bytes | memoryview, factor: int, shape: tuple[int, int],
                   out: np.ndarray | None) -> np.ndarray | None:
    h, w, comps = frame_size(stream)
    if (h, w) != shape or comps != 3:
        raise ValueError(_frame_error(h, w, comps, shape))
    bgr = cv2.imdecode(np.frombuffer(stream, np.uint8), REDUCE_FLAGS[factor])
    if bgr is None:
        return None
    if out is None or out.shape != bgr.shape:
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)


# decoder name -> (stream, factor, frame (h, w) it must have, out: a C-contiguous [h / f, w / f, 3] uint8 to
# decode into, or None) -> RGB uint8 (None: failed); raises ValueError for another frame. "simplejpeg" needs
# the package.
DECODERS: dict[str, Callable[[bytes | memoryview, int, tuple[int, int], np.ndarray | None], np.ndarray | None]] = {
    "simplejpeg": _decode_simplejpeg, "opencv": _decode_opencv}


def default_decoder() -> str:
    """``simplejpeg`` when it is installed, else ``opencv``."""
    return "opencv" if _simplejpeg is None else "simplejpeg"


def _checked(out: np.ndarray | None, h: int, w: int, factor: int) -> np.ndarray:
    want = (-(-h // factor), -(-w // factor), 3)
    if out is None or out.shape != want:
        raise ValueError(f"JPEG decode failed (got {None if out is None else out.shape}, expected {want})")
    return out


def decode_reduced(stream: bytes, factor: int, shape: tuple[int, int], frame: bytes | None = None,
                   decoder: str | None = None) -> np.ndarray:
    """[h / factor, w / factor, 3] uint8 RGB of a standalone JPEG ``stream`` whose frame is ``shape`` (h, w),
    decoded at 1/``factor`` scale (1, 2, 4, 8) by ``decoder`` (:data:`DECODERS`; None: :func:`default_decoder`).
    ``frame``: the bytes holding the SOF marker (the tile's own data; JPEGTables hold no frame), checked
    before anything is allocated. Raises ValueError when the frame is not ``shape`` x 3 or the stream does
    not decode to the reduced size (simplejpeg also raises on a truncated or corrupt stream)."""
    h, w, comps = frame_size(stream if frame is None else frame)
    if (h, w) != tuple(shape) or comps != 3:
        raise ValueError(_frame_error(h, w, comps, shape))
    if factor not in REDUCE_FLAGS:
        raise ValueError(f"no libjpeg scale 1/{factor}")
    return _checked(DECODERS[decoder or default_decoder()](stream, factor, (h, w), None), h, w, factor)


class TileDecoder:
    """Decodes the JPEG tiles of one TIFF page (``shape`` = (h, w) of a tile, the page's ``JPEGTables``, RGB or
    YCbCr) at 1/f scale: what :func:`tile_stream` + :func:`decode_reduced` do, with the stream prefix built
    once and, in :meth:`read`, the tile's bytes read from the file straight behind it (no copy, no
    allocation per tile). Raises ValueError like them."""

    def __init__(self, tables: bytes | None, rgb: bool, shape: tuple[int, int], decoder: str | None = None):
        self.prefix, self.shape = stream_prefix(tables, rgb), (int(shape[0]), int(shape[1]))
        self._fn = DECODERS[decoder or default_decoder()]
        self._buf = bytearray(self.prefix)  # prefix, then the last tile read (grown as needed)

    def _decode(self, stream: bytes | memoryview, factor: int, out: np.ndarray | None) -> np.ndarray:
        if factor not in REDUCE_FLAGS:
            raise ValueError(f"no libjpeg scale 1/{factor}")
        return _checked(self._fn(stream, factor, self.shape, out), self.shape[0], self.shape[1], factor)

    def __call__(self, data: bytes, factor: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tile ``data`` (its own stream, SOI first) at 1/``factor``: [h / f, w / f, 3] RGB, in ``out`` if given."""
        if data[:2] != _SOI:
            raise ValueError("tile data does not start with a JPEG SOI marker")
        return self._decode(self.prefix + memoryview(data)[2:], factor, out)

    def read(self, fd: int, offset: int, count: int, factor: int, out: np.ndarray | None = None) -> np.ndarray:
        """The tile of ``count`` bytes at ``offset`` of the open file ``fd`` (``os.preadv``), decoded as in
        :meth:`__call__`; OSError when the file is shorter."""
        n = len(self.prefix)
        if len(self._buf) < n - 2 + count:  # a new buffer (views of the old one may still be alive)
            self._buf = bytearray(self.prefix) + bytes(count)
        view = memoryview(self._buf)
        try:  # the tile (SOI first) over the prefix's last 2 bytes (its SOI's place), then those put back
            got = os.preadv(fd, [view[n - 2:n - 2 + count]], offset)
            soi = bytes(view[n - 2:n])
        finally:
            view[n - 2:n] = self.prefix[n - 2:]
        if got != count:
            raise OSError(f"read {got} of {count} bytes at offset {offset}")
        if soi != _SOI:
            raise ValueError("tile data does not start with a JPEG SOI marker")
        return self._decode(view[:n - 2 + count], factor, out)
