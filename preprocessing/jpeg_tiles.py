"""Reduced-size decoding of TIFF JPEG tiles: 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo via OpenCV).

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
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["REDUCE_FLAGS", "stream_prefix", "tile_stream", "frame_size", "decode_reduced"]

_ORIENT = getattr(cv2, "IMREAD_IGNORE_ORIENTATION", 128)
# reduction factor -> OpenCV imdecode flag (libjpeg-turbo scale_denom)
REDUCE_FLAGS = {1: cv2.IMREAD_COLOR | _ORIENT, 2: cv2.IMREAD_REDUCED_COLOR_2 | _ORIENT,
                4: cv2.IMREAD_REDUCED_COLOR_4 | _ORIENT, 8: cv2.IMREAD_REDUCED_COLOR_8 | _ORIENT}
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


def decode_reduced(stream: bytes, factor: int, shape: tuple[int, int], bgr: bool = False,
                   frame: bytes | None = None) -> np.ndarray:
    """[h / factor, w / factor, 3] uint8 RGB (BGR when ``bgr``) of a standalone JPEG ``stream`` whose frame is
    ``shape`` (h, w), decoded at 1/``factor`` scale (1, 2, 4, 8). ``frame``: the bytes holding the SOF marker
    (the tile's own data; JPEGTables hold no frame), checked before anything is allocated. Raises ValueError
    when the frame is not ``shape`` x 3 or the stream does not decode to the reduced size."""
    h, w, comps = frame_size(stream if frame is None else frame)
    if (h, w) != tuple(shape) or comps != 3:
        raise ValueError(f"JPEG frame {h}x{w}x{comps}, expected {shape[0]}x{shape[1]}x3")
    out = cv2.imdecode(np.frombuffer(stream, np.uint8), REDUCE_FLAGS[factor])
    want = (-(-h // factor), -(-w // factor), 3)
    if out is None or out.shape != want:
        raise ValueError(f"JPEG decode failed (got {None if out is None else out.shape}, expected {want})")
    return out if bgr else cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
