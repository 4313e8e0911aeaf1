"""Fast region reads straight from the tiles of a tiled TIFF level (tifffile + imagecodecs).

OpenSlide spends ~1.4 ms per 256² region even when the tile is in its cache (cairo compositing, ARGB →
RGBA → PIL → numpy), while decoding the JPEG tile itself takes ~0.35 ms. For levels that are plain
tiled, 8-bit, 3-sample, chunky TIFF pages (Aperio SVS, generic pyramidal TIFF) this module decodes the
tiles a region covers and copies them into place, so a read costs about one decode per tile.

It is only a shortcut: :class:`TiffLevels` answers ``None`` whenever it cannot reproduce OpenSlide's
result exactly (a level it could not match to one TIFF page, a level > 0 region whose origin is not on a
whole level pixel — OpenSlide renders those with sub-pixel interpolation), and the caller falls back to
OpenSlide. Pixels outside the level are white, as OpenSlide's transparent pixels composited on white.
A tile that fails to decode raises :class:`TileDecodeError`.

:meth:`TiffLevels.read_reduced` is the ``--read-path fast`` variant: the region at 1/2, 1/4 or 1/8 scale,
each JPEG tile decoded at that scale in the DCT domain (:mod:`preprocessing.jpeg_tiles`) instead of decoding
every pixel and resizing; not bit-identical to the exact path (see ``bench/results/extract.md``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_ncmi.errors import UserError

from .jpeg_tiles import REDUCE_FLAGS, TileDecoder, frame_size

log = logging.getLogger(__name__)

__all__ = ["TiffLevels", "TileDecodeError", "FAST_VENDORS"]

# OpenSlide vendors whose levels are the tiled pages of the file, rendered without any transform
FAST_VENDORS = ("aperio", "generic-tiff")
_CACHE_TILES = 64  # decoded tiles kept (a grid that does not align with the tiles reuses neighbours)


class TileDecodeError(UserError):
    """A TIFF tile could not be read or decoded."""


class _Level:
    """One tiled page: its tile geometry and a decoder."""

    def __init__(self, page) -> None:
        self.page = page
        self.h, self.w = int(page.imagelength), int(page.imagewidth)
        self.th, self.tw = int(page.tilelength), int(page.tilewidth)
        self.cols = -(-self.w // self.tw)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        self.tables = page.jpegtables
        photometric = int(page.photometric)
        # JPEG tiles in RGB (2) or YCbCr (6): what the reduced (DCT-domain) decoder handles
        self.jpeg = int(page.compression) == 7 and photometric in (2, 6)
        self.rgb = photometric == 2
        self._decoder: TileDecoder | None = None  # built on the first reduced read
        self._scratch: dict[int, np.ndarray] = {}  # factor -> [th / f, tw / f, 3]: tiles no other region needs
        self._empty: np.ndarray | None = None  # [rows, cols] bool, built on first use

    def decoder(self) -> TileDecoder:
        if self._decoder is None:
            self._decoder = TileDecoder(self.tables, self.rgb, (self.th, self.tw))
        return self._decoder

    def scratch(self, factor: int) -> np.ndarray:
        buf = self._scratch.get(factor)
        if buf is None:
            buf = self._scratch[factor] = np.empty((-(-self.th // factor), -(-self.tw // factor), 3), np.uint8)
        return buf

    def whole_tiles(self, x: int, y: int, w: int, h: int) -> list[int] | None:
        """Row-major indices of the tiles making up the level region (x, y, w, h) when its edges lie on tile
        borders (rows = h / th, cols = w / tw), else None."""
        if x % self.tw or y % self.th or w % self.tw or h % self.th:
            return None
        first = (y // self.th) * self.cols + x // self.tw
        return [first + j * self.cols + i for j in range(h // self.th) for i in range(w // self.tw)]

    def empty_tiles(self) -> np.ndarray:
        """[rows, cols] bool: tiles never written (byte count 0, a sparse TIFF); OpenSlide draws them transparent."""
        if self._empty is None:
            counts = np.asarray(self.counts, np.int64)
            rows = -(-self.h // self.th)
            if counts.size < rows * self.cols:  # malformed: treat missing entries as present (decode decides)
                counts = np.concatenate([counts, np.ones(rows * self.cols - counts.size, np.int64)])
            self._empty = (counts[:rows * self.cols] == 0).reshape(rows, self.cols)
        return self._empty


def _usable(page) -> bool:
    return (bool(page.is_tiled) and int(page.samplesperpixel) == 3 and int(page.bitspersample) == 8
            and int(page.planarconfig) == 1 and int(getattr(page, "imagedepth", 1)) == 1
            and not getattr(page, "extrasamples", ()))


class TiffLevels:
    """Region reads from the tiled pages matching OpenSlide's levels; ``read`` returns None to fall back."""

    def __init__(self, tif, levels: dict[int, _Level], downsamples: Sequence[float], fd: int | None = None):
        self._tif, self._levels, self._downs = tif, levels, tuple(downsamples)
        self._fh = tif.filehandle
        self._fd = fd  # our own descriptor of the file (tile offsets are absolute): os.preadv, no seek
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, vendor: str | None, level_dimensions: Sequence[tuple[int, int]],
             downsamples: Sequence[float]) -> TiffLevels | None:
        """The fast reader for ``path``, or None when no OpenSlide level maps to exactly one usable page."""
        if vendor not in FAST_VENDORS:
            return None
        try:
            import tifffile

            tif = tifffile.TiffFile(str(path))
        except Exception as e:  # tifffile/imagecodecs missing or a file it cannot parse
            log.debug("%s: no fast TIFF path (%s)", path, e)
            return None
        try:
            pages = [p for p in tif.pages if p.is_tiled]
            levels: dict[int, _Level] = {}
            for i, (w, h) in enumerate(level_dimensions):
                match = [p for p in pages if (int(p.imagewidth), int(p.imagelength)) == (w, h)]
                if len(match) == 1 and _usable(match[0]):
                    levels[i] = _Level(match[0])
        except Exception as e:
            log.debug("%s: no fast TIFF path (%s)", path, e)
            levels = {}
        if not levels:
            tif.close()
            return None
        fd = None
        if hasattr(os, "preadv"):
            try:
                fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                log.debug("%s: reads through tifffile's handle (%s)", path, e)
        return cls(tif, levels, downsamples, fd)

    @classmethod
    def from_pages(cls, tif, pages: Sequence, downsamples: Sequence[float]) -> TiffLevels:
        """Region reads from ``pages`` (level i = ``pages[i]``, e.g. an OME-TIFF's SubIFD pyramid) of the open
        ``tif``; a level whose page is not plain tiled 8-bit RGB is left out (``read`` answers None)."""
        return cls(tif, {i: _Level(p) for i, p in enumerate(pages) if _usable(p)}, downsamples)

    def has_level(self, level: int) -> bool:
        return level in self._levels

    def _tile(self, level: int, lv: _Level, index: int) -> np.ndarray:
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count == 0:  # a sparse TIFF: the tile was never written
            raise TileDecodeError(f"tile {index} of level {level} has no data")
        try:
            self._fh.seek(offset)
            data = self._fh.read(count)
            seg, _, shape = lv.page.decode(data, index, jpegtables=lv.tables)
        except Exception as e:
            raise TileDecodeError(f"tile {index} of level {level}: {type(e).__name__}: {e}") from e
        if seg is None or tuple(np.shape(seg))[-3:] != (lv.th, lv.tw, 3):
            raise TileDecodeError(f"tile {index} of level {level}: decoded shape {np.shape(seg)}")
        tile = np.asarray(seg).reshape(lv.th, lv.tw, 3)
        self._cache[key] = tile
        if len(self._cache) > _CACHE_TILES:
            self._cache.popitem(last=False)
        return tile

    def _tile_reduced(self, level: int, lv: _Level, index: int, factor: int, whole: bool) -> np.ndarray:
        """Tile ``index`` decoded at 1/``factor`` scale [th / f, tw / f, 3] RGB. ``whole``: the region being
        read holds all of the tile, so no other region needs it: decoded into the level's scratch buffer
        (valid until the next such call), else into its own array, cached like full tiles."""
        key = (level, index, factor)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        offset, count = int(lv.offsets[index]), int(lv.counts[index])
        if count == 0:
            raise TileDecodeError(f"tile {index} of level {level} has no data")
        out = lv.scratch(factor) if whole else None
        try:
            if self._fd is not None:
                tile = lv.decoder().read(self._fd, offset, count, factor, out)
            else:
                self._fh.seek(offset)
                tile = lv.decoder()(self._fh.read(count), factor, out)
        except Exception as e:
            raise TileDecodeError(f"tile {index} of level {level}: {type(e).__name__}: {e}") from e
        if not whole:
            self._cache[key] = tile
            if len(self._cache) > _CACHE_TILES:
                self._cache.popitem(last=False)
        return tile

    def read_reduced(self, location: tuple[int, int], level: int, size: tuple[int, int],
                     factor: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """[h / f, w / f, 3] uint8 RGB: the region of :meth:`read` at 1/``factor`` scale, each JPEG tile
        decoded at that scale; None (use the exact path) unless the level has JPEG tiles and the region's
        origin, size and the tile size are multiples of ``factor`` (1, 2, 4 or 8), or when a tile fails to
        decode. ``out``: an array of that shape to write into (returned; its content is undefined after None)."""
        win = self._window(location, level, size)
        if win is None or factor not in REDUCE_FLAGS:
            return None
        lv, x, y, (x0, y0, x1, y1) = win
        f = factor
        if not lv.jpeg or any(v % f for v in (x, y, int(size[0]), int(size[1]), lv.tw, lv.th)):
            return None
        shape = (int(size[1]) // f, int(size[0]) // f, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out is {out.dtype} {out.shape}, expected uint8 {shape}")
        w, h = int(size[0]), int(size[1])
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[...] = 255  # white outside the level
        elif self._fd is not None and (tiles := lv.whole_tiles(x, y, w, h)) is not None:
            return self._read_reduced_aligned(level, lv, tiles, w // lv.tw, f, out)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // lv.th, (y1 - 1) // lv.th + 1):
            for tx in range(x0 // lv.tw, (x1 - 1) // lv.tw + 1):
                gx, gy = tx * lv.tw, ty * lv.th
                ax, ay = max(x0, gx), max(y0, gy)
                bx, by = min(x1, gx + lv.tw), min(y1, gy + lv.th)  # level px; all multiples of f but x1, y1
                whole = (ax, ay, bx, by) == (gx, gy, gx + lv.tw, gy + lv.th)
                try:
                    tile = self._tile_reduced(level, lv, ty * lv.cols + tx, f, whole)
                except TileDecodeError as e:  # the exact path decides (OpenSlide's own error for a corrupt tile)
                    log.debug("reduced read failed, reading exactly: %s", e)
                    return None
                oy, ox = (ay - y) // f, (ax - x) // f
                part = tile[(ay - gy) // f:-(-(by - gy) // f), (ax - gx) // f:-(-(bx - gx) // f)]
                out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
        return out

    def _read_reduced_aligned(self, level: int, lv: _Level, tiles: list[int], cols: int, f: int,
                              out: np.ndarray) -> np.ndarray | None:
        """:meth:`read_reduced` of a region made of whole tiles inside the level (e.g. 512-px reads of
        256-px tiles; ``tiles``: :meth:`_Level.whole_tiles`, ``cols`` per row): no tile is cut, so none is
        cached; each is decoded into the level's scratch buffer and copied into place."""
        decoder, scratch, fd = lv.decoder(), lv.scratch(f), self._fd
        th, tw = lv.th // f, lv.tw // f
        for k, t in enumerate(tiles):
            j, i = divmod(k, cols)
            count = int(lv.counts[t])
            try:
                if count == 0:
                    raise ValueError("no data")
                tile = decoder.read(fd, int(lv.offsets[t]), count, f, scratch)
            except Exception as e:  # the exact path decides (OpenSlide's own error for a corrupt tile)
                log.debug("reduced read failed, reading exactly: tile %d of level %d: %s", t, level, e)
                return None
            out[j * th:(j + 1) * th, i * tw:(i + 1) * tw] = tile
        return out

    def jpeg_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    out: bytearray, ends: list[int]) -> tuple[int, int, int, int] | None:
        """The region's JPEG tiles as standalone streams (:func:`~preprocessing.jpeg_tiles.tile_stream`),
        row-major, appended to ``out`` (the end of each in ``out`` appended to ``ends``); returns (rows, cols,
        tile h, tile w), or None (``out``, ``ends`` unchanged) unless
        the region is made of whole JPEG tiles inside the level, each starting with SOI and a ``tile h x tile
        w x 3`` frame (anything else: the pixel path decides, with its errors). Nothing is decoded here."""
        win = self._window(location, level, size)
        if win is None or self._fd is None:
            return None
        lv, x, y, (x0, y0, x1, y1) = win
        w, h = int(size[0]), int(size[1])
        tiles = lv.whole_tiles(x, y, w, h) if lv.jpeg and (x0, y0, x1, y1) == (x, y, x + w, y + h) else None
        if tiles is None:
            return None
        prefix, start, n_ends = lv.decoder().prefix, len(out), len(ends)
        for t in tiles:
            count, offset = int(lv.counts[t]), int(lv.offsets[t])
            try:
                data = os.pread(self._fd, count, offset) if count > 4 else b""
                ok = len(data) == count and data[:2] == b"\xff\xd8" and frame_size(data) == (lv.th, lv.tw, 3)
            except (OSError, ValueError):
                ok = False
            if not ok:  # a sparse, short or malformed tile: the pixel path reads it (or drops it)
                del out[start:], ends[n_ends:]
                return None
            out += prefix
            out += memoryview(data)[2:]
            ends.append(len(out))
        return h // lv.th, w // lv.tw, lv.th, lv.tw

    def _window(self, location: tuple[int, int], level: int,
                size: tuple[int, int]) -> tuple[_Level, int, int, tuple[int, int, int, int]] | None:
        """(level, x, y, (x0, y0, x1, y1)): the region's level-pixel origin and its part inside the level, or
        None when the level has no matching page or OpenSlide would interpolate (a non-integer origin)."""
        lv = self._levels.get(level)
        if lv is None:
            return None
        ds = self._downs[level]
        fx, fy = location[0] / ds, location[1] / ds
        x, y = round(fx), round(fy)
        if abs(fx - x) > 1e-6 or abs(fy - y) > 1e-6:  # OpenSlide would interpolate: let it
            return None
        return lv, x, y, (max(x, 0), max(y, 0), min(x + int(size[0]), lv.w), min(y + int(size[1]), lv.h))

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray | None:
        """[h, w, 3] uint8 of the region (level-0 ``location``, ``size`` at ``level``), or None to fall back."""
        win = self._window(location, level, size)
        if win is None:
            return None
        lv, x, y, (x0, y0, x1, y1) = win
        out = np.full((int(size[1]), int(size[0]), 3), 255, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // lv.th, (y1 - 1) // lv.th + 1):
            for tx in range(x0 // lv.tw, (x1 - 1) // lv.tw + 1):
                tile = self._tile(level, lv, ty * lv.cols + tx)
                gx, gy = tx * lv.tw, ty * lv.th  # tile origin in level pixels
                ax, ay = max(x0, gx), max(y0, gy)
                bx, by = min(x1, gx + lv.tw), min(y1, gy + lv.th)
                out[ay - y:by - y, ax - x:bx - x] = tile[ay - gy:by - gy, ax - gx:bx - gx]
        return out

    def is_empty(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> bool:
        """True when every tile the region covers has no data (reads as white, as in OpenSlide); False when
        unknown (a level without a matching page, a region OpenSlide would interpolate)."""
        win = self._window(location, level, size)
        if win is None:
            return False
        lv, _, _, (x0, y0, x1, y1) = win
        if x1 <= x0 or y1 <= y0:
            return True
        return bool(lv.empty_tiles()[y0 // lv.th:(y1 - 1) // lv.th + 1, x0 // lv.tw:(x1 - 1) // lv.tw + 1].all())

    def close(self) -> None:
        self._cache.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()
