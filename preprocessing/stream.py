"""The reading side of the pipeline: ``SlideStream``, the DataLoader dataset whose workers take slides from a
shared queue, segment tissue, plan and read the tiles, and send uint8 batches (with ``--jpeg-decode device``
also ``jpeg`` batches of undecoded regions, :mod:`preprocessing.device_decode`) plus one ``end`` message per
slide to the main process (see :mod:`preprocessing.extract` for the whole design)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .config import PreprocessConfig
from .device_decode import JpegBatch, usable
from .locks import try_lock
from .manifest import atomic_write_bytes
from .outdir import disk_full_message, is_disk_full
from .plan import (
    BAGS_DIR,
    COORDS_DIR,
    LOCKS_DIR,
    THUMBS_DIR,
    SlideTask,
    bag_mismatch,
    file_size,
    json_diff,
    source_mismatch,
    tiling_fingerprint,
    tissue_params,
)
from .readers import (
    TileReadError,
    UnreadableSlideError,
    open_slide,
    preload_libraries,
)
from .tiling import EffectiveMppError, MppTooCoarseError, TilePlan, grid_coords, plan_tiles
from .tissue import TissueMask, draw_overview, segment_tissue, tile_fractions

log = logging.getLogger(__name__)

__all__ = ["SlideStream", "read_tile", "POOL_SLOTS"]

POOL_SLOTS = 6  # shared-memory batches a worker reuses: its prefetch (4) + the one in use + the one being filled

# ----------------------------------------------------------------------------------------- reading
def read_tile(reader: Any, xy: tuple[int, int], plan: TilePlan, fast: bool = False,
              out: np.ndarray | None = None) -> np.ndarray:
    """One tile [P, P, 3] uint8 at the plan's effective mpp (level-0 top-left ``xy``), written into ``out``
    (C-contiguous [P, P, 3] uint8, e.g. a batch slot; returned) when given. ``fast`` (``--read-path fast``):
    when the read is exactly 2, 4 or 8 times the tile, the reader may decode its JPEG tiles at that reduced
    scale instead (not bit-identical); otherwise, or when it cannot, read and resize."""
    loc, size = (int(xy[0]), int(xy[1])), (plan.read_size, plan.read_size)
    factor, rest = divmod(plan.read_size, plan.patch_size)
    reduced = getattr(reader, "read_region_reduced", None) if fast and rest == 0 and factor > 1 else None
    if reduced is not None:
        tile = reduced(loc, plan.level, size, factor, out)
        if tile is not None:
            return tile
    region = reader.read_region(loc, plan.level, size)
    if plan.read_size == plan.patch_size:
        if out is None:
            return region
        out[...] = region
        return out
    interp = cv2.INTER_AREA if plan.read_size > plan.patch_size else cv2.INTER_LINEAR
    tile = cv2.resize(region, (plan.patch_size, plan.patch_size), dst=out, interpolation=interp)
    if out is not None and tile is not out:  # OpenCV allocated its own (not expected for a contiguous slot)
        out[...] = tile
    return out if out is not None else tile


def size_refusal(dimensions: tuple[int, int], cfg: PreprocessConfig) -> str:
    """Why a slide of level-0 ``dimensions`` (w, h) is refused under ``--max-side-px`` / ``--max-gigapixels``,
    or "" when it is not (a header can declare any size; reading it would take hours)."""
    w, h = int(dimensions[0]), int(dimensions[1])
    gpx = w * h / 1e9
    if max(w, h) <= cfg.max_side_px and gpx <= cfg.max_gigapixels:
        return ""
    return (f"level 0 declares {w} x {h} px ({gpx:.3g} gigapixels), beyond the limits --max-side-px "
            f"{cfg.max_side_px} / --max-gigapixels {cfg.max_gigapixels:g}: a corrupt or hostile header; if the "
            "slide is real, raise the limit")


class SlideStream(IterableDataset):
    """Messages for the main loop: ``{"kind": "tiles", ...}`` batches, then one ``{"kind": "end", ...}``."""

    def __init__(self, tasks: list[SlideTask], cfg: PreprocessConfig, fingerprint: dict[str, Any],
                 owner_pid: int, out_dir: Path, workers: int = 0):
        self.tasks, self.cfg, self.fingerprint = tasks, cfg, fingerprint
        self.owner_pid, self.out = owner_pid, out_dir
        self.order = sorted(range(len(tasks)), key=lambda i: -file_size(tasks[i].path))  # largest first
        self.next_slide = multiprocessing.Value("q", 0)  # shared queue head (has its own lock)
        # worker id -> (pid, index of the slide it is reading or -1); shared memory, read by the main
        # process to name the slide of a worker that died
        self.current = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()  # [W, 2]
        # 1 = pooled batch (worker w owns slots w * POOL_SLOTS ...) sent and not yet released by the consumer
        self.busy = multiprocessing.Array("b", max(workers, 1) * POOL_SLOTS)
        if workers:
            preload_libraries()  # once here, not once per forked worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        track = wid < len(self.current)  # a stream made for fewer workers than its DataLoader has
        while (task := self._take()) is not None:
            if track:
                self.current[wid, 0], self.current[wid, 1] = os.getpid(), task.index
            yield from self._slide(task)
        if track:
            self.current[wid, 1] = -1

    def _take(self) -> SlideTask | None:
        """The next slide of the shared queue, or None when every slide has been taken."""
        with self.next_slide.get_lock():
            k = int(self.next_slide.value)
            if k >= len(self.order):
                return None
            self.next_slide.value = k + 1
        return self.tasks[self.order[k]]

    def slides_of_dead_workers(self, pids: set[int]) -> list[int]:
        """Indices of the slides that the workers with these pids were reading."""
        return [int(i) for p, i in self.current.tolist() if p in pids and i >= 0]

    def slides_in_flight(self) -> list[int]:
        return [int(i) for _, i in self.current.tolist() if i >= 0]

    def _end(self, task: SlideTask, status: str, message: str = "", **kw: Any) -> dict[str, Any]:
        return {"kind": "end", "slide": task.index, "status": status, "message": message, **kw}

    def _slide(self, task: SlideTask) -> Iterator[dict[str, Any]]:
        cfg, t0 = self.cfg, time.time()
        lock = self.out / LOCKS_DIR / f"{task.slide_id}.lock"
        try:
            locked = try_lock(lock, cfg.lock_timeout, owner_pid=self.owner_pid)
        except OSError as e:  # a full disk or a folder that became read-only: not this slide's fault
            yield self._end(task, "error", disk_full_message(lock, e) if is_disk_full(e) else
                            f"{lock}: cannot create the lock file ({e.strerror or e})", t0=t0,
                            disk_full=is_disk_full(e), stop=True)
            return
        if not locked:
            yield self._end(task, "skipped", "locked by another process", locked=True, t0=t0)
            return
        bag = self.out / BAGS_DIR / f"{task.slide_id}.h5"
        if "extract" in cfg.stage_set and not cfg.overwrite and bag_mismatch(bag, self.fingerprint, task) is None:
            yield self._end(task, "skipped", "bag up to date (finished by another process)", t0=t0, done=True)
            return
        try:
            yield from self._process(task, t0)
        except UnreadableSlideError as e:
            yield self._end(task, "unreadable", str(e), t0=t0)
        except Exception as e:  # one bad slide must not stop the run
            if is_disk_full(e):  # e.g. the thumbnail: the main process records it and stops the run
                yield self._end(task, "error", disk_full_message(getattr(e, "filename", None) or self.out, e),
                                t0=t0, disk_full=True, stop=True)
                return
            log.error("%s: %s\n%s", task.path, e, traceback.format_exc())
            yield self._end(task, "error", f"{type(e).__name__}: {e}", t0=t0)

    def _process(self, task: SlideTask, t0: float) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        reader = open_slide(task.path, mpp=task.mpp_override)
        try:
            geo = {"width": reader.dimensions[0], "height": reader.dimensions[1], "mpp": reader.mpp,
                   "magnification": reader.magnification}
            too_big = size_refusal(reader.dimensions, cfg)
            if too_big:
                yield self._end(task, "error", f"{task.path}: {too_big}", t0=t0, geo=geo)
                return
            if reader.mpp is None:
                rejected = getattr(reader, "mpp_rejected", "")
                yield self._end(task, "mpp_missing", f"{task.path}: the slide has no pixel size (mpp)"
                                f"{'; rejected ' + rejected if rejected else ''}; add a row "
                                f"'{task.slide_id},<mpp>' to a CSV with header slide_id,mpp and pass --mpp-csv",
                                t0=t0, geo=geo)
                return
            try:
                plan = plan_tiles(reader.mpp, reader.level_downsamples, cfg.target_mpp, cfg.patch_size,
                                  cfg.overlap, cfg.mpp_tolerance)
            except (MppTooCoarseError, EffectiveMppError) as e:
                yield self._end(task, "error", f"{task.path}: {e}", t0=t0, geo=geo)
                return
            reused = self._reuse_coords(task, reader, plan)
            if reused is not None:
                coords, frac = reused
            else:
                coords, frac = self._segment_and_tile(task, reader, plan)
            common = dict(t0=t0, geo=geo, plan=plan, coords=coords, tissue_fraction=frac)
            if len(coords) == 0:
                yield self._end(task, "no_tissue", f"no tile with tissue fraction >= {cfg.min_tissue}", **common)
                return
            if "extract" not in cfg.stage_set:
                yield self._end(task, "ok", "", bad=np.zeros(0, np.int64), **common)
                return
            bad: list[int] = []
            index: list[int] = []
            shared = get_worker_info() is not None
            fast = cfg.read_path == "fast"
            # --jpeg-decode device: whole-tile JPEG regions go to the encoder process undecoded
            jpeg = JpegBatch(plan) if cfg.jpeg_decode == "device" and usable(plan) else None
            view, slot = None, -1  # the batch being filled [B, P, P, 3] (a numpy view) and its pool slot
            try:
                for i, xy in enumerate(coords):
                    if jpeg is not None and jpeg.add(reader, i, xy):
                        if len(jpeg) == cfg.batch_size:
                            yield self._jpeg(task, jpeg, plan.patch_size, shared)
                        continue
                    if view is None:
                        batch, slot = self._batch(min(cfg.batch_size, len(coords) - i), plan.patch_size, shared)
                        view = batch.numpy()  # writes go into the batch
                    try:
                        read_tile(reader, xy, plan, fast, out=view[len(index)])
                        index.append(i)
                    except TileReadError as e:
                        log.warning("%s: dropping tile %d at %s: %s", task.slide_id, i, tuple(xy), e)
                        bad.append(i)
                    if len(index) == len(view):
                        msg, index, view, slot = self._tiles(task, batch, index, slot), [], None, -1
                        yield msg
                if index:
                    msg, view, slot = self._tiles(task, batch[:len(index)], index, slot), None, -1
                    yield msg
                if jpeg is not None and len(jpeg):
                    yield self._jpeg(task, jpeg, plan.patch_size, shared)
            finally:  # a slot claimed for a batch that was never sent (its tiles all failed, an error)
                self._free_slot(slot)
            yield self._end(task, "ok", "", bad=np.asarray(bad, np.int64), **common)
        finally:
            reader.close()

    def _segment_and_tile(self, task: SlideTask, reader: Any, plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
        """Tissue mask, kept tile grid [K, 2] and tissue fractions [K]; writes the overview PNG."""
        cfg = self.cfg
        params = tissue_params(cfg)
        thumb, ds, failed = reader.read_level_scaled(max(1.0, params.seg_mpp / reader.mpp))
        tm = segment_tissue(thumb, ds, reader.mpp, params)
        coords = grid_coords(*reader.dimensions, plan)  # [M, 2]
        frac = tile_fractions(tm, coords, plan.patch_size_level0)  # [M]
        keep = frac >= max(cfg.min_tissue, 1e-6)
        if failed.any():  # regions the thumbnail could not decode: try their tiles (they count as bad)
            unknown = TissueMask(failed.astype(np.uint8), ds, [], 0.0)
            keep |= tile_fractions(unknown, coords, plan.patch_size_level0) > 0
        coords, frac = coords[keep], frac[keep]
        overview = draw_overview(thumb, tm, coords, plan.patch_size_level0)
        ok, png = cv2.imencode(".png", cv2.cvtColor(overview, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(self.out / THUMBS_DIR / f"{task.slide_id}.png", png.tobytes())
        return coords, frac

    def _reuse_coords(self, task: SlideTask, reader: Any, plan: TilePlan) -> tuple[np.ndarray, np.ndarray] | None:
        """Tile grid and tissue fractions from ``coords/<id>.h5`` of an earlier tile stage, when this run
        extracts without tiling and that file was made with the same tiling settings, mpp and source file."""
        if "extract" not in self.cfg.stage_set or "tile" in self.cfg.stage_set:
            return None
        path = self.out / COORDS_DIR / f"{task.slide_id}.h5"
        if not path.is_file():
            log.info("%s: no %s from a tile stage; segmenting and tiling now", task.slide_id, path)
            return None
        import h5py

        try:
            with h5py.File(path, "r") as f:
                attrs = dict(f.attrs)
                coords = np.asarray(f["coords"][:], np.int64)  # [K, 2]
                frac = np.asarray(f["tissue_fraction"][:], np.float32)  # [K]
        except (OSError, KeyError) as e:
            log.warning("%s: cannot read %s (%s); segmenting and tiling again", task.slide_id, path, e)
            return None
        why = (json_diff(attrs.get("tiling_json"), tiling_fingerprint(self.cfg), "tiling settings")
               or source_mismatch(attrs, task)
               or json_diff(attrs.get("plan_json"), json.loads(json.dumps(plan.to_dict())), "reading plan"))
        if why is None and (coords.ndim != 2 or coords.shape[1:] != (2,) or len(frac) != len(coords)):
            why = f"malformed coords {coords.shape} / tissue_fraction {frac.shape}"
        if why is not None:
            log.warning("%s: not reusing %s (%s); segmenting and tiling again", task.slide_id, path, why)
            return None
        log.info("%s: reusing %d tiles from %s", task.slide_id, len(coords), path)
        return coords, frac

    @staticmethod
    def _tiles(task: SlideTask, batch: torch.Tensor, index: list[int], slot: int = -1) -> dict[str, Any]:
        return {"kind": "tiles", "slide": task.index,
                "tiles": batch,  # [B, P, P, 3] uint8
                # [B] int64; numpy travels inside the pickle (a tensor would cost a second shm file + fd)
                "index": np.asarray(index, np.int64),
                "slot": slot}  # >= 0: a pooled batch; pass the message to release() once done with it

    def _jpeg(self, task: SlideTask, jpeg: JpegBatch, patch: int, shared: bool) -> dict[str, Any]:
        """The ``jpeg`` message of the collected regions, their bytes in a pooled batch (as many rows as they fill)."""
        batch, slot = self._batch(-(-len(jpeg.data) // (patch * patch * 3)), patch, shared)
        return jpeg.message(task.index, batch.view(-1), slot)  # pass it to release() once decoded

    # ------------------------------------------------------------------ pooled shared-memory batches
    def _batch(self, n: int, patch: int, shared: bool) -> tuple[torch.Tensor, int]:
        """An empty batch [n, P, P, 3] uint8 and its pool slot (-1: not pooled). In a DataLoader worker, a
        batch of this worker's pool that the main process has released, refilled in place: a fresh
        shared-memory batch costs ~0.2-0.3 ms of page faults per 256-px tile, about a fifth of reading it."""
        info = get_worker_info()
        wid = info.id if info is not None else -1
        if not shared or not 0 <= wid < len(self.current):
            return _new_batch(n, patch, shared), -1
        with self.busy.get_lock():  # a full barrier: the main process's last reads of a released batch are done
            free = [k for k in range(wid * POOL_SLOTS, (wid + 1) * POOL_SLOTS) if not self.busy[k]]
            if free:
                self.busy[free[0]] = 1
        if not free:  # every pooled batch is still held by the main process: a fresh one
            return _new_batch(n, patch, shared), -1
        pool = self.__dict__.setdefault("_pool", {})  # this worker's batches, allocated on first use
        batch = pool.get(free[0])
        if batch is None or batch.shape[1] != patch or len(batch) < n:
            batch = pool[free[0]] = _new_batch(max(n, self.cfg.batch_size), patch, True)
        return batch[:max(n, 1)], free[0]

    def _free_slot(self, slot: int) -> None:
        if slot >= 0:
            with self.busy.get_lock():
                self.busy[slot] = 0

    def release(self, msg: dict[str, Any]) -> None:
        """The consumer is done with ``msg["tiles"]`` (encoded, or copied to pinned memory): its worker may
        refill that shared-memory batch. A message never released only costs its worker a fresh batch."""
        self._free_slot(int(msg.get("slot", -1)))


def _new_batch(n: int, patch: int, shared: bool) -> torch.Tensor:
    """An empty uint8 batch [n, P, P, 3]; in a DataLoader worker it lives in shared memory from the start
    (allocated there, not copied there), so tiles are written once and handing the batch to the main
    process copies nothing."""
    shape = (max(n, 1), patch, patch, 3)
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
