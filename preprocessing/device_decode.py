"""``--jpeg-decode device``: the JPEG tiles of whole-tile regions travel undecoded from the readers to the
encoder process, which decodes them on the encoder's device (nvJPEG through ``torchvision.io.decode_jpeg`` on
CUDA, libjpeg-turbo on CPU), assembles each region and reduces it to the tile size by area averaging.

On CPU, entropy (Huffman) decoding is most of a reader's work and no scaled decode removes it; moving the
decode to the GPU leaves the CPU workers reading bytes. Pixels: the full-size decode + area average is what the
exact path (``--read-path exact``: full-size decode + OpenCV ``INTER_AREA``) computes; with torchvision's CPU
decoder (libjpeg-turbo, as tifffile/imagecodecs) they are bit-identical (tested); nvJPEG's IDCT and chroma
upsampling may differ by a grey level or so (measured on a GPU only).

* Worker side, :class:`JpegBatch`: for a tile whose read is a region of whole JPEG tiles of a TIFF level
  (:meth:`preprocessing.tiff_tiles.TiffLevels.jpeg_region`: e.g. a 512-px read of 256-px tiles), the tiles'
  standalone streams (JPEGTables + Adobe colour marker spliced in) are appended to one buffer; a full batch
  becomes one ``{"kind": "jpeg"}`` message whose bytes lie in a pooled shared-memory batch of
  :class:`~preprocessing.stream.SlideStream`. Other tiles (not aligned, not JPEG, a sparse or malformed
  tile) take the pixel path as before.
* Main side, :class:`DeviceDecoder`: turns a ``jpeg`` message into the ``tiles`` message the encoder takes
  (uint8 [n, P, P, 3], on the device). A region whose streams fail to decode is read again in the main
  process by the pixel path's ``read_tile`` (same fallbacks, same result: kept, or dropped and counted in
  ``bad_tiles`` with the same log line) — today's handling of a corrupt tile, whatever the decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .plan import SlideTask
from .readers import SlideReader, open_slide
from .tiling import TilePlan

log = logging.getLogger(__name__)

__all__ = ["JpegBatch", "DeviceDecoder", "ASSEMBLERS", "area_reduce", "usable"]

_CHUNK = 64  # regions reduced at once (float32 [64, 3, 512, 512] = 200 MB)


def usable(plan: TilePlan) -> bool:
    """Whether the plan's reads can be reduced to tiles by an integer area average (read = k x patch)."""
    return plan.read_size % plan.patch_size == 0


def area_reduce(x: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 [m, 3, H, W] -> uint8 [m, 3, H / f, W / f]: the mean of each f x f block, rounded as OpenCV's
    ``INTER_AREA`` rounds an integer-factor reduction (f = 2: half up; other f: half to even), so the result
    is bit-identical to ``cv2.resize(..., INTER_AREA)`` of the same pixels."""
    if factor == 1:
        return x
    out = torch.empty((*x.shape[:2], x.shape[2] // factor, x.shape[3] // factor), dtype=torch.uint8, device=x.device)
    for i in range(0, len(x), _CHUNK):
        s = F.avg_pool2d(x[i:i + _CHUNK].float(), factor, divisor_override=1)  # block sums, exact in float32
        out[i:i + _CHUNK] = torch.floor((s + 2) / 4) if factor == 2 else torch.round(s / (factor * factor))
    return out


def _assemble_torch(images: list[torch.Tensor], grid: tuple[int, int, int, int], factor: int) -> torch.Tensor:
    """[m * r * c] tiles [3, th, w] (region-major, row-major) -> uint8 [m, P, P, 3]: on their device (CUDA)."""
    rows, cols, th, tw = grid
    x = torch.stack([im.permute(1, 2, 0) for im in images])  # [m * r * c, th, tw, 3]
    x = x.view(-1, rows, cols, th, tw, 3).permute(0, 5, 1, 3, 2, 4)  # [m, 3, r, th, c, tw]
    x = area_reduce(x.reshape(len(x), 3, rows * th, cols * tw), factor)  # [m, 3, P, P]
    return x.permute(0, 2, 3, 1)  # [m, P, P, 3] (a channels-last view)


def _assemble_opencv(images: list[torch.Tensor], grid: tuple[int, int, int, int], factor: int) -> torch.Tensor:
    """As :func:`_assemble_torch` on CPU with numpy + ``cv2.resize(INTER_AREA)`` (what the exact path runs; ~10x
    less CPU than torch's CPU kernels here): each region assembled in one buffer, then reduced into the batch."""
    rows, cols, th, tw = grid
    per = rows * cols
    region = np.empty((rows * th, cols * tw, 3), np.uint8)
    out = np.empty((len(images) // per, rows * th // factor, cols * tw // factor, 3), np.uint8)  # [m, P, P, 3]
    for k in range(len(out)):
        for t in range(per):
            j, i = divmod(t, cols)
            region[j * th:(j + 1) * th, i * tw:(i + 1) * tw] = images[k * per + t].permute(1, 2, 0).numpy()
        if factor == 1:
            out[k] = region
        else:
            cv2.resize(region, out.shape[1:3][::-1], dst=out[k], interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out)


# how decoded tiles become the batch: name -> (tiles [3, th, tw] of m regions, (rows, cols, th, tw), factor) ->
# uint8 [m, P, P, 3] on the tiles' device. DeviceDecoder picks "opencv" on CPU, "torch" elsewhere.
ASSEMBLERS: dict[str, Callable[[list[torch.Tensor], tuple[int, int, int, int], int], torch.Tensor]] = {
    "torch": _assemble_torch, "opencv": _assemble_opencv}


class JpegBatch:
    """The undecoded regions of one slide collected for the next ``jpeg`` message (worker side)."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.data = bytearray()  # the standalone streams, back to back
        self.ends: list[int] = []  # end of each stream in ``data``
        self.index: list[int] = []  # tile index (in the slide's coords) of each region
        self.xy: list[tuple[int, int]] = []
        self.grid: tuple[int, int, int, int] | None = None  # (rows, cols, tile h, tile w) of every region

    def __len__(self) -> int:
        return len(self.index)

    def add(self, reader: SlideReader, i: int, xy: Sequence[int]) -> bool:
        """Take tile ``i`` (level-0 ``xy``) undecoded; False when its region is not made of whole JPEG tiles
        (the caller reads it as pixels)."""
        read = getattr(reader, "read_region_jpeg", None)
        if read is None:
            return False
        loc, size, n, k = (int(xy[0]), int(xy[1])), (self.plan.read_size,) * 2, len(self.data), len(self.ends)
        grid = read(loc, self.plan.level, size, self.data, self.ends)
        if grid is None:
            return False
        if self.grid is not None and grid != self.grid:  # one level, one tile size: not expected
            del self.data[n:], self.ends[k:]
            return False
        self.grid = grid
        self.index.append(i)
        self.xy.append(loc)
        return True

    def message(self, slide: int, buf: torch.Tensor, slot: int) -> dict[str, Any]:
        """The ``jpeg`` message of the collected regions, their bytes copied into ``buf`` (uint8 [>= nbytes],
        e.g. a pooled shared-memory batch claimed as ``slot``); the batch is emptied for the next one."""
        n = len(self.data)
        buf.numpy()[:n] = np.frombuffer(self.data, np.uint8)
        msg = {"kind": "jpeg", "slide": slide,
               "data": buf[:n],  # [nbytes] uint8: the streams
               "ends": np.asarray(self.ends, np.int64),  # [n * rows * cols]
               "index": np.asarray(self.index, np.int64),  # [n]
               "xy": np.asarray(self.xy, np.int64).reshape(-1, 2),  # [n, 2] level-0 top-left (re-reads)
               "grid": self.grid, "plan": self.plan, "slot": slot}
        self.data, self.ends, self.index, self.xy = bytearray(), [], [], []
        return msg


ReadTile = Callable[[SlideReader, Sequence[int], TilePlan, bool], np.ndarray]


class DeviceDecoder:
    """Main side: ``jpeg`` messages -> ``tiles`` messages (uint8 [n, P, P, 3] on ``device``).

    ``tasks``: the slides (``msg["slide"]`` indexes them), to re-read a region that fails to decode with
    ``read_tile`` (the pixel path's function; ``fast``: ``--read-path fast``). ``assembler``: a name of
    :data:`ASSEMBLERS` (None: ``opencv`` on CPU, ``torch`` on other devices)."""

    def __init__(self, device: torch.device | str, tasks: Sequence[SlideTask], read_tile: ReadTile, fast: bool,
                 assembler: str | None = None):
        self.device = torch.device(device)
        self.assemble = ASSEMBLERS[assembler or ("opencv" if self.device.type == "cpu" else "torch")]
        from torchvision.io import ImageReadMode, decode_jpeg  # here, not on the first batch (~1 s to import)

        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.tasks, self.read_tile, self.fast = tasks, read_tile, fast
        self._readers: dict[int, SlideReader] = {}  # slides with a re-read region, until their end
        self._bad: dict[int, list[int]] = {}  # slide -> tiles dropped here

    def tiles(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The ``tiles`` message of a ``jpeg`` one: decoded, assembled, reduced; regions that fail to decode
        re-read by the pixel path (dropped when that fails too: ``index`` may then be shorter, even empty)."""
        rows, cols, th, tw = msg["grid"]
        plan: TilePlan = msg["plan"]
        per = rows * cols
        images = self._decode(msg["data"], msg["ends"])
        ok = [all(im is not None and tuple(im.shape) == (3, th, tw) for im in images[k * per:(k + 1) * per])
              for k in range(len(msg["index"]))]
        good = [k for k, v in enumerate(ok) if v]
        parts, index = [], []
        if good:
            parts.append(self.assemble([images[k * per + t] for k in good for t in range(per)], msg["grid"],
                                       plan.read_size // plan.patch_size))  # [m, P, P, 3]
            index += [int(msg["index"][k]) for k in good]
        for k in (k for k, v in enumerate(ok) if not v):
            tile = self._reread(msg["slide"], int(msg["index"][k]), msg["xy"][k], plan)
            if tile is not None:
                parts.append(torch.from_numpy(tile).to(self.device)[None])  # [1, P, P, 3]
                index.append(int(msg["index"][k]))
        p = plan.patch_size
        tiles = (parts[0] if len(parts) == 1 else torch.cat(parts) if parts
                 else torch.empty((0, p, p, 3), dtype=torch.uint8, device=self.device))
        return {"kind": "tiles", "slide": msg["slide"], "tiles": tiles,  # [n, P, P, 3] uint8 on the device
                "index": np.asarray(index, np.int64), "slot": msg["slot"]}

    def _decode(self, data: torch.Tensor, ends: np.ndarray) -> list[torch.Tensor | None]:
        """[3, h, w] uint8 RGB per stream (None: failed). One batched call; when it raises, stream by stream."""
        decode_jpeg, rgb = self._decode_jpeg, self._rgb
        starts = np.concatenate([[0], ends[:-1]])
        streams = [data[int(a):int(b)] for a, b in zip(starts, ends)]  # [len] uint8 views, CPU
        try:
            return list(decode_jpeg(streams, mode=rgb, device=self.device))
        except (RuntimeError, TypeError) as e:  # a corrupt stream; TypeError: torchvision < 0.19 takes no list
            log.debug("batched JPEG decode failed (%s); decoding stream by stream", e)
        out: list[torch.Tensor | None] = []
        for s in streams:
            try:
                out.append(decode_jpeg(s, mode=rgb, device=self.device))
            except RuntimeError as e:
                log.debug("JPEG stream failed to decode: %s", e)
                out.append(None)
        return out

    def _reread(self, slide: int, i: int, xy: np.ndarray, plan: TilePlan) -> np.ndarray | None:
        """Tile ``i`` through the pixel path in this process ([P, P, 3] uint8), or None (dropped, counted)."""
        task = self.tasks[slide]
        try:
            reader = self._readers.get(slide)
            if reader is None:
                reader = self._readers[slide] = open_slide(task.path, mpp=task.mpp_override)
            return self.read_tile(reader, (int(xy[0]), int(xy[1])), plan, self.fast)
        except Exception as e:  # TileReadError, as in the workers (anything else: also this tile only)
            log.warning("%s: dropping tile %d at %s: %s", task.slide_id, i, (int(xy[0]), int(xy[1])), e)
            self._bad.setdefault(slide, []).append(i)
            return None

    def end(self, msg: dict[str, Any]) -> None:
        """A slide's ``end`` message: the tiles dropped here join its ``bad`` ones; its reader is closed."""
        self.forget(msg["slide"], msg)

    def forget(self, slide: int, msg: dict[str, Any] | None = None) -> None:
        """Drop what is kept for ``slide`` (``msg``: its ``end`` message, whose ``bad`` gets the dropped tiles)."""
        bad = self._bad.pop(slide, [])
        if msg is not None and bad and msg.get("bad") is not None:
            msg["bad"] = np.sort(np.concatenate([np.asarray(msg["bad"], np.int64), np.asarray(bad, np.int64)]))
        reader = self._readers.pop(slide, None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        for slide in list(self._readers):
            self.forget(slide)
