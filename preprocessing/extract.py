"""The pipeline: slides → tissue → tiles → features → one HDF5 bag per slide, resumable and shareable.

Design (one DataLoader for the whole run):

* ``SlideStream`` is an ``IterableDataset`` over the pending slides. The DataLoader workers take slides
  from one shared queue (a counter in shared memory), largest file first, so a worker that finishes early
  takes the next slide instead of idling while another works through a fixed share (longest-first
  scheduling keeps the tail short when slide sizes differ). A worker takes the slide's lock, opens the slide once, segments tissue, plans
  the tiles, writes the overview PNG, then yields the tiles as uint8 batches ``[B, P, P, 3]`` tagged with
  the slide, and finally one ``end`` message (status, coords, tissue fractions, bad tiles, geometry).
  A worker writes each tile straight into a batch tensor allocated in shared memory, so handing it to the
  main process copies nothing; the tile indices travel as a numpy array inside the message.
* Tiles are resized to the target mpp in the worker (cv2 ``INTER_AREA``, ~0.12 ms per 512² → 256² tile on
  one core, a small fraction of the decode): shipping raw regions for a device-side resize would multiply
  the shared-memory and host-to-device traffic by ``(read_size / patch_size)²`` (4x for 0.25 → 0.5 µm/px).
  Regions of tiled TIFF levels are decoded straight from the file's tiles (``tiff_tiles``), bit-identical
  to OpenSlide and ~4x cheaper per tile.
* The main process moves each batch to the device (pinned memory, ``non_blocking``), normalises there and
  runs the encoder, collecting features per slide; on a slide's ``end`` it writes the bag atomically,
  updates the manifest and releases the lock. Workers run ahead by ``prefetch_factor`` batches each and
  own different slides, so the next slides are read and segmented while the model works on the current
  one. ``in_order=False`` lets a fast worker's batches pass a slow one's; per-worker order (tiles before
  their ``end``) is all the main loop relies on.
* A tile whose region fails to decode is dropped and counted in ``bad_tiles`` (logged, never replaced by
  white). Thumbnail regions that fail to decode are not taken for glass: their tiles are tried too (and
  counted as bad when they fail). A slide that cannot be opened gets status ``unreadable``; the run goes on.
* Features stay on the device (in the stored dtype) until the slide's ``end``: no per-batch host sync.
* A slide that is (re)processed and ends ``error``/``unreadable``/``mpp_missing``/``no_tissue`` has its
  previous bag moved from ``bags/`` to ``stale/<slide_id>.h5`` (logged, noted in the manifest message),
  so a bag made with other settings never stays where training reads bags.
* ``--stages seg,tile`` writes ``coords/<id>.h5`` (tile grid, tissue fractions, reading plan, tiling
  settings); a later ``--stages extract`` run reuses it when the tiling settings, mpp and source file
  (size + mtime) match, else it tiles again (logged). So tiling can run on CPU nodes and extraction on GPUs.
* A DataLoader worker that dies hard (e.g. a segfault inside OpenSlide) does not end the run: the slide
  it was reading (known from a small shared table of worker -> slide) is recorded as ``error`` naming the
  dead process, and the slides not yet finished are read again by a fresh DataLoader.

``workers=0`` runs the same stream in the main process (no read-ahead) — used by the tests.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsi_ncmi.data.bags import BagError, validate_bag, write_bag

from .config import PreprocessConfig
from .encoders import RANDOM, Encoder, build_encoder, resolve_device, resolve_spec, sha256_file
from .locks import HOST, release_lock, try_lock
from .manifest import Manifest, atomic_path, atomic_write_bytes, summary_table
from .readers import (
    IMAGE_EXTENSIONS,
    PLAUSIBLE_MPP,
    SlideError,
    TileReadError,
    UnreadableSlideError,
    find_slides,
    open_slide,
    plausible_mpp,
    slide_id_of,
)
from .tiling import EffectiveMppError, MppTooCoarseError, TilePlan, grid_coords, plan_tiles
from .tissue import TissueMask, TissueParams, draw_overview, segment_tissue, tile_fractions

log = logging.getLogger(__name__)

__all__ = ["SlideTask", "RunResult", "run", "plan_slides", "settings_fingerprint", "bag_mismatch",
           "tiling_fingerprint", "read_tile", "BAGS_DIR", "THUMBS_DIR", "LOCKS_DIR", "COORDS_DIR", "STALE_DIR",
           "FAILED_STATUSES"]

BAGS_DIR, THUMBS_DIR, LOCKS_DIR, COORDS_DIR, STALE_DIR = "bags", "thumbnails", "locks", "coords", "stale"
FAILED_STATUSES = ("unreadable", "error", "mpp_missing")  # a run with any of these exits non-zero
FAIL_FAST_STATUSES = FAILED_STATUSES
# outcomes after which a previous bag of the slide no longer describes it: moved to STALE_DIR
RETIRE_BAG_STATUSES = ("unreadable", "error", "mpp_missing", "no_tissue")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass(frozen=True)
class SlideTask:
    index: int
    slide_id: str
    path: Path
    mpp_override: float | None = None


@dataclass
class RunResult:
    statuses: dict[str, str] = field(default_factory=dict)  # slide_id -> status
    written: list[str] = field(default_factory=list)  # bags written by this process
    locked: list[str] = field(default_factory=list)  # slides another process was working on
    stopped: str = ""  # why the run stopped before the end (--fail-fast), "" when it did not

    def summary(self) -> str:
        return summary_table(self.statuses)

    def failed(self) -> list[str]:
        """Slides that ended error / unreadable / mpp_missing (no_tissue is not a failure)."""
        return sorted(k for k, v in self.statuses.items() if v in FAILED_STATUSES)


# ----------------------------------------------------------------------------------------- settings
def _tissue_params(cfg: PreprocessConfig) -> TissueParams:
    return TissueParams(seg_mpp=cfg.seg_mpp, method=cfg.tissue_method, threshold=cfg.tissue_threshold)


def _compute_precision(cfg: PreprocessConfig) -> str:
    return cfg.precision if resolve_device(cfg.device).type == "cuda" else "fp32"


def tiling_fingerprint(cfg: PreprocessConfig) -> dict[str, Any]:
    """Everything that changes the tile grid of a slide; stored in ``coords/<id>.h5`` as ``tiling_json``."""
    return {
        "target_mpp": float(cfg.target_mpp),
        "patch_size": int(cfg.patch_size),
        "overlap": int(cfg.overlap),
        "min_tissue": float(cfg.min_tissue),
        "mpp_tolerance": float(cfg.mpp_tolerance),
        "tissue": _tissue_params(cfg).to_dict(),
    }


def _encoder_settings(cfg: PreprocessConfig) -> dict[str, Any]:
    """The encoder's effective model kwargs and preprocessing (preset / timm defaults + overrides)."""
    if "extract" not in cfg.stage_set:  # no encoder is built: record what was asked
        return {"encoder_kwargs": cfg.encoder_kwargs_dict, "mean": cfg.mean, "std": cfg.std,
                "input_size": cfg.input_size}
    spec = resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size)
    return {"encoder_kwargs": json.loads(json.dumps(spec.kwargs, sort_keys=True)), "mean": list(spec.mean),
            "std": list(spec.std), "input_size": spec.input_size}


def settings_fingerprint(cfg: PreprocessConfig, weights_sha256: str) -> dict[str, Any]:
    """Everything that changes a bag's content; stored as ``settings_json`` and compared on resume."""
    return {
        "encoder": cfg.encoder,
        "weights_sha256": weights_sha256,
        **_encoder_settings(cfg),
        **tiling_fingerprint(cfg),
        "compute_precision": _compute_precision(cfg),
        "features_dtype": cfg.features_dtype,
    }


def _source_stat(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a slide file; (-1, -1) when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _source_mismatch(attrs: Any, task: SlideTask) -> str | None:
    """Why an output made from ``attrs`` no longer matches the slide file / mpp override, or None."""
    override = -1.0 if task.mpp_override is None else float(task.mpp_override)
    if float(attrs.get("mpp_override", -1.0)) != override:
        return f"mpp override changed: {attrs.get('mpp_override')} -> {override}"
    size, mtime = _source_stat(task.path)
    if int(attrs.get("source_size", -2)) != size:
        return f"source file changed size: {attrs.get('source_size')} -> {size}"
    if int(attrs.get("source_mtime_ns", -2)) != mtime:
        return f"source file changed (modification time {attrs.get('source_mtime_ns')} -> {mtime} ns)"
    return None


def _json_diff(stored_json: Any, wanted: dict[str, Any], what: str) -> str | None:
    try:
        stored = json.loads(stored_json or "{}")
    except (TypeError, ValueError):
        stored = {}
    diff = sorted(k for k in set(wanted) | set(stored) if stored.get(k) != wanted.get(k))
    if diff:
        return f"{what} changed: " + ", ".join(f"{k} {stored.get(k)!r} -> {wanted.get(k)!r}" for k in diff)
    return None


def bag_mismatch(path: Path, fingerprint: dict[str, Any], task: SlideTask) -> str | None:
    """None when the bag at ``path`` is valid and was made with these settings, else the reason."""
    if not path.is_file():
        return "no bag yet"
    try:
        info = validate_bag(path, check_values=False)
    except BagError as e:
        return f"invalid bag: {e}"
    attrs = info["attrs"]
    return _json_diff(attrs.get("settings_json"), fingerprint, "settings") or _source_mismatch(attrs, task)


def _read_mpp_csv(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    out: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide_id", "mpp"} <= set(reader.fieldnames):
            raise SlideError(f"--mpp-csv {path}: needs columns slide_id,mpp (has {reader.fieldnames})")
        for row in reader:
            try:
                v = float(row["mpp"])
            except ValueError:
                raise SlideError(f"--mpp-csv {path}: bad mpp {row['mpp']!r} for {row['slide_id']}") from None
            if v <= 0:
                raise SlideError(f"--mpp-csv {path}: mpp must be > 0 for {row['slide_id']}")
            if not plausible_mpp(v):
                log.warning("--mpp-csv %s: mpp %g for %s is outside the usual %s µm/px; used as given",
                            path, v, row["slide_id"], PLAUSIBLE_MPP)
            out[row["slide_id"].strip()] = v
    return out


def _read_slide_list(path: str | None) -> set[str] | None:
    if not path:
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        col = next((c for c in ("slide_id", "path", "slide") if c in (reader.fieldnames or [])), None)
        if col is None:
            raise SlideError(f"--slides {path}: needs a slide_id (or path) column")
        return {slide_id_of(r[col].strip()) if col == "path" else r[col].strip() for r in reader}


def plan_slides(cfg: PreprocessConfig) -> list[SlideTask]:
    """The sorted slide list of this shard, restricted by ``--slides``, with ``--mpp-csv`` overrides.

    Plain images (png/jpg) are slides only when ``--mpp-csv`` has their mpp or ``--slides`` lists them;
    others are ignored with a warning (so stray pictures in a slide folder do not fail the run).
    """
    paths = find_slides(cfg.input)
    wanted = _read_slide_list(cfg.slides)
    mpps = _read_mpp_csv(cfg.mpp_csv)
    if wanted is not None:
        missing = wanted - {slide_id_of(p) for p in paths}
        if missing:
            log.warning("--slides lists %d slide(s) not found under %s: %s", len(missing), cfg.input,
                        sorted(missing)[:5])
        paths = [p for p in paths if slide_id_of(p) in wanted]
    else:  # a png/jpg in a slide folder is a slide only when the user gave its mpp
        images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and slide_id_of(p) not in mpps]
        if images:
            log.warning("ignoring %d plain image(s) without a --mpp-csv row (a png/jpg is a slide only with its "
                        "mpp there, or when --slides lists it): %s", len(images), ", ".join(p.name for p in images[:5]))
            skip = set(images)
            paths = [p for p in paths if p not in skip]
    i, n = cfg.shard_index
    paths = [p for k, p in enumerate(paths) if k % n == i]
    return [SlideTask(k, slide_id_of(p), p, mpps.get(slide_id_of(p))) for k, p in enumerate(paths)]


# ----------------------------------------------------------------------------------------- reading
def read_tile(reader: Any, xy: tuple[int, int], plan: TilePlan) -> np.ndarray:
    """One tile [P, P, 3] uint8 at the plan's effective mpp (level-0 top-left ``xy``)."""
    region = reader.read_region((int(xy[0]), int(xy[1])), plan.level, (plan.read_size, plan.read_size))
    if plan.read_size == plan.patch_size:
        return region
    interp = cv2.INTER_AREA if plan.read_size > plan.patch_size else cv2.INTER_LINEAR
    return cv2.resize(region, (plan.patch_size, plan.patch_size), interpolation=interp)


class SlideStream(IterableDataset):
    """Messages for the main loop: ``{"kind": "tiles", ...}`` batches, then one ``{"kind": "end", ...}``."""

    def __init__(self, tasks: list[SlideTask], cfg: PreprocessConfig, fingerprint: dict[str, Any],
                 owner_pid: int, out_dir: Path, workers: int = 0):
        self.tasks, self.cfg, self.fingerprint = tasks, cfg, fingerprint
        self.owner_pid, self.out = owner_pid, out_dir
        self.order = sorted(range(len(tasks)), key=lambda i: -_file_size(tasks[i].path))  # largest first
        self.next_slide = multiprocessing.Value("q", 0)  # shared queue head (has its own lock)
        # worker id -> (pid, index of the slide it is reading or -1); shared memory, read by the main
        # process to name the slide of a worker that died
        self.current = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()  # [W, 2]

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
        if not try_lock(lock, cfg.lock_timeout, owner_pid=self.owner_pid):
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
            log.error("%s: %s\n%s", task.path, e, traceback.format_exc())
            yield self._end(task, "error", f"{type(e).__name__}: {e}", t0=t0)

    def _process(self, task: SlideTask, t0: float) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        reader = open_slide(task.path, mpp=task.mpp_override)
        try:
            geo = {"width": reader.dimensions[0], "height": reader.dimensions[1], "mpp": reader.mpp,
                   "magnification": reader.magnification}
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
            batch = _new_batch(min(cfg.batch_size, len(coords)), plan.patch_size, shared)  # [B, P, P, 3]
            for i, xy in enumerate(coords):
                try:
                    batch.numpy()[len(index)] = read_tile(reader, xy, plan)  # a view: writes into the batch
                    index.append(i)
                except TileReadError as e:
                    log.warning("%s: dropping tile %d at %s: %s", task.slide_id, i, tuple(xy), e)
                    bad.append(i)
                if len(index) == len(batch):
                    yield self._tiles(task, batch, index)
                    index = []
                    batch = _new_batch(min(cfg.batch_size, len(coords) - i - 1), plan.patch_size, shared)
            if index:
                yield self._tiles(task, batch[:len(index)], index)
            yield self._end(task, "ok", "", bad=np.asarray(bad, np.int64), **common)
        finally:
            reader.close()

    def _segment_and_tile(self, task: SlideTask, reader: Any, plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
        """Tissue mask, kept tile grid [K, 2] and tissue fractions [K]; writes the overview PNG."""
        cfg = self.cfg
        params = _tissue_params(cfg)
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
        why = (_json_diff(attrs.get("tiling_json"), tiling_fingerprint(self.cfg), "tiling settings")
               or _source_mismatch(attrs, task)
               or _json_diff(attrs.get("plan_json"), json.loads(json.dumps(plan.to_dict())), "reading plan"))
        if why is None and (coords.ndim != 2 or coords.shape[1:] != (2,) or len(frac) != len(coords)):
            why = f"malformed coords {coords.shape} / tissue_fraction {frac.shape}"
        if why is not None:
            log.warning("%s: not reusing %s (%s); segmenting and tiling again", task.slide_id, path, why)
            return None
        log.info("%s: reusing %d tiles from %s", task.slide_id, len(coords), path)
        return coords, frac

    @staticmethod
    def _tiles(task: SlideTask, batch: torch.Tensor, index: list[int]) -> dict[str, Any]:
        return {"kind": "tiles", "slide": task.index,
                "tiles": batch,  # [B, P, P, 3] uint8
                # [B] int64; numpy travels inside the pickle (a tensor would cost a second shm file + fd)
                "index": np.asarray(index, np.int64)}


def _new_batch(n: int, patch: int, shared: bool) -> torch.Tensor:
    """An empty uint8 batch [n, P, P, 3]; in a DataLoader worker it lives in shared memory from the start,
    so tiles are written once and handing the batch to the main process copies nothing."""
    batch = torch.empty((max(n, 1), patch, patch, 3), dtype=torch.uint8)
    return batch.share_memory_() if shared else batch


# ----------------------------------------------------------------------------------------- main loop
class _Writer:
    """Main-process side: features per slide, bag / manifest writing, lock release."""

    def __init__(self, cfg: PreprocessConfig, tasks: list[SlideTask], fingerprint: dict[str, Any],
                 encoder: Encoder | None, out: Path, result: RunResult):
        self.cfg, self.tasks, self.fp, self.encoder, self.out, self.result = cfg, tasks, fingerprint, encoder, out, result
        self.manifest = Manifest(out / "manifest.csv")
        self.parts: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = {}

    def tiles(self, msg: dict[str, Any]) -> int:
        assert self.encoder is not None
        # [B, D] stays on the device until the slide ends: no per-batch device->host sync
        feats = self.encoder.encode(msg["tiles"]).to(_TORCH_DTYPES[self.cfg.features_dtype])
        self.parts.setdefault(msg["slide"], []).append((msg["index"], feats))
        return len(msg["index"])

    def end(self, msg: dict[str, Any]) -> str:
        task = self.tasks[msg["slide"]]
        parts = self.parts.pop(msg["slide"], [])
        lock = self.out / LOCKS_DIR / f"{task.slide_id}.lock"
        if msg.get("locked"):
            log.info("%s: skipped, locked by another process", task.slide_id)
            self.result.locked.append(task.slide_id)
            return "skipped"
        try:
            status, message, n, nbad = self._finish(task, msg, parts)
        except Exception as e:  # e.g. a write failure: record and go on
            log.error("%s: %s\n%s", task.slide_id, e, traceback.format_exc())
            status, message, n, nbad = "error", f"{type(e).__name__}: {e}", 0, 0
        try:
            if status in RETIRE_BAG_STATUSES and not msg.get("done"):
                moved = self._retire_bag(task, status)
                if moved is not None:
                    message = f"{message}; previous bag moved to {moved}".lstrip("; ")
        finally:
            release_lock(lock, os.getpid())
        plan: TilePlan | None = msg.get("plan")
        geo = msg.get("geo") or {}
        row = {"slide_id": task.slide_id, "path": str(task.path), "status": status, "n_tiles": n,
               "bad_tiles": nbad, "mpp": geo.get("mpp") or "", "effective_mpp": plan.effective_mpp if plan else "",
               "seconds": f"{time.time() - msg['t0']:.2f}", "message": message}
        self.manifest.update(row, keep_ok=bool(msg.get("done")))
        self.result.statuses[task.slide_id] = status
        (log.info if status in ("ok", "skipped") else log.warning)(
            "%s: %s %s", task.slide_id, status, message or f"({n} tiles, {nbad} bad)")
        return status

    def _retire_bag(self, task: SlideTask, status: str) -> Path | None:
        """Move ``bags/<id>.h5`` (made earlier, with other settings or another file) to ``stale/<id>.h5``."""
        bag = self.out / BAGS_DIR / f"{task.slide_id}.h5"
        if not bag.is_file():
            return None
        dst = self.out / STALE_DIR / bag.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(bag, dst)
        log.warning("%s: ended %s; its previous bag no longer matches the slide and was moved to %s",
                    task.slide_id, status, dst)
        return dst.relative_to(self.out)

    def _finish(self, task: SlideTask, msg: dict[str, Any], parts: list) -> tuple[str, str, int, int]:
        status, message = msg["status"], msg["message"]
        coords = msg.get("coords")
        n = 0 if coords is None else len(coords)
        if status != "ok":
            return status, message, n, 0
        stages = self.cfg.stage_set
        plan: TilePlan = msg["plan"]
        attrs = self._attrs(task, msg)
        coords_attrs = self._coords_attrs(msg)
        if "extract" not in stages:
            if "tile" in stages:
                attrs = {**attrs, "tiling_json": json.dumps(tiling_fingerprint(self.cfg), sort_keys=True),
                         "plan_json": json.dumps(plan.to_dict(), sort_keys=True)}
                self._write_coords(task, coords, msg["tissue_fraction"], attrs, coords_attrs)
            return "ok", message, n, 0
        bad = msg["bad"]
        if not parts:
            return "error", f"all {n} tiles failed to read (first errors are in the log)", 0, len(bad)
        index = np.concatenate([p[0] for p in parts])  # [K]
        feats = torch.cat([p[1] for p in parts]).cpu()  # [K, D]
        order = np.argsort(index, kind="stable")
        index, feats = index[order], feats[torch.as_tensor(order)]
        if len(bad):
            message = f"dropped {len(bad)} unreadable tile(s)"
        write_bag(self.out / BAGS_DIR / f"{task.slide_id}.h5", feats.numpy(), coords[index], attrs,
                  tissue_fraction=msg["tissue_fraction"][index], coords_attrs=coords_attrs)
        log.info("wrote %s (%d x %d) pid %d", task.slide_id, len(index), feats.shape[1], os.getpid())
        self.result.written.append(task.slide_id)
        assert plan is not None
        return "ok", message, len(index), len(bad)

    def _attrs(self, task: SlideTask, msg: dict[str, Any]) -> dict[str, Any]:
        plan: TilePlan = msg["plan"]
        enc = self.encoder
        size, mtime = _source_stat(task.path)
        return {
            "slide_id": task.slide_id, "source_path": str(task.path), "source_size": size,
            "source_mtime_ns": mtime,
            "slide_mpp": plan.slide_mpp, "target_mpp": plan.target_mpp, "effective_mpp": plan.effective_mpp,
            "encoder": self.cfg.encoder, "weights_sha256": self.fp["weights_sha256"],
            "embed_dim": enc.embed_dim if enc else None,
            "compute_precision": self.fp["compute_precision"],
            "normalization": enc.normalization if enc else "", "patch_size_px": plan.patch_size,
            "encoder_kwargs": json.dumps(enc.kwargs if enc else self.fp.get("encoder_kwargs", {}), sort_keys=True),
            "encoder_arch": enc.arch if enc else "",
            "overlap": self.cfg.overlap, "min_tissue": self.cfg.min_tissue, "tissue_method": self.cfg.tissue_method,
            "read_level": plan.level, "read_size": plan.read_size,
            "mpp_override": -1.0 if task.mpp_override is None else float(task.mpp_override),
            "settings_json": json.dumps(self.fp, sort_keys=True), "host": HOST,
        }

    @staticmethod
    def _coords_attrs(msg: dict[str, Any]) -> dict[str, Any]:
        plan: TilePlan = msg["plan"]
        mag = (msg.get("geo") or {}).get("magnification")
        return {"patch_size": plan.patch_size, "patch_level": 0, "patch_size_level0": plan.patch_size_level0,
                "level0_magnification": float(mag) if mag else -1.0,
                "target_magnification": float(mag) * plan.slide_mpp / plan.target_mpp if mag else -1.0,
                "read_level": plan.level, "stride_level0": plan.stride_level0}

    def _write_coords(self, task: SlideTask, coords: np.ndarray, frac: np.ndarray, attrs: dict,
                      coords_attrs: dict) -> None:
        import h5py

        path = self.out / COORDS_DIR / f"{task.slide_id}.h5"
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=coords.astype(np.int64))
                for k, v in coords_attrs.items():
                    ds.attrs[k] = v
                f.create_dataset("tissue_fraction", data=frac.astype(np.float32))
                for k, v in attrs.items():
                    if v is not None:
                        f.attrs[k] = v


def _identity(msg: dict[str, Any]) -> dict[str, Any]:
    return msg  # no default_convert: numpy arrays and plans travel as they are


def _weights_sha(cfg: PreprocessConfig) -> str:
    if cfg.weights is None:
        return ""
    return RANDOM if cfg.weights == RANDOM else sha256_file(cfg.weights)


def _loader_kwargs() -> dict[str, Any]:
    """``in_order=False`` (torch >= 2.6) lets a fast worker's batches pass a slow one's; older torch keeps
    the round-robin order, which is only slower when slides differ in size."""
    return {"in_order": False} if "in_order" in inspect.signature(DataLoader.__init__).parameters else {}


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def _dead_worker_pids(e: BaseException) -> set[int] | None:
    """The pids named by torch's "DataLoader worker (pid ...) exited unexpectedly / is killed by signal"
    error, or None when ``e`` is not that error."""
    m = _WORKER_DIED.search(str(e)) if isinstance(e, RuntimeError) else None
    return None if m is None else {int(p) for p in re.findall(r"\d+", m.group(1))}


@contextmanager
def _quiet_sigchld() -> Iterator[None]:
    """Replace torch's SIGCHLD handler while our loader runs. That handler raises "worker died" at whatever
    line the main thread is on (half-way through writing a bag, or blaming the slide being written); without
    it the DataLoader still notices a dead worker, at a defined place: ``next()`` after at most 5 s."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, prev)


def run(cfg: PreprocessConfig) -> RunResult:
    """Process every pending slide of ``cfg``; returns statuses (also in ``OUT/manifest.csv``)."""
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_slides(cfg)
    result = RunResult()
    extract = "extract" in cfg.stage_set
    if extract:
        # unknown names / bad overrides fail before any slide work
        resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size)
        if cfg.weights is None:
            build_encoder(cfg.encoder, None)  # raises the clear "needs --weights" error
    fp = settings_fingerprint(cfg, _weights_sha(cfg))
    manifest = Manifest(out / "manifest.csv")
    pending: list[SlideTask] = []
    for t in tasks:
        why = "overwrite requested" if cfg.overwrite else (
            bag_mismatch(out / BAGS_DIR / f"{t.slide_id}.h5", fp, t) if extract else "no extract stage")
        if why is None:
            result.statuses[t.slide_id] = "skipped"
            manifest.update({"slide_id": t.slide_id, "path": str(t.path), "status": "skipped",
                             "message": "bag up to date"}, keep_ok=True)
            log.info("%s: bag up to date, skipped", t.slide_id)
            continue
        if why != "no bag yet":
            log.info("%s: redoing (%s)", t.slide_id, why)
        pending.append(t)
    log.info("%d slide(s) in shard %s, %d pending", len(tasks), cfg.shard, len(pending))
    if not pending:
        return result
    pending = [SlideTask(k, t.slide_id, t.path, t.mpp_override) for k, t in enumerate(pending)]
    encoder = build_encoder(cfg.encoder, cfg.weights, cfg.device, cfg.precision, cfg.compile,
                            kwargs=cfg.encoder_kwargs_dict, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
                            tile_size=cfg.patch_size) if extract else None
    writer = _Writer(cfg, pending, fp, encoder, out, result)
    from tqdm.auto import tqdm

    slides_bar = tqdm(total=len(pending), desc="slides", unit="slide", disable=not cfg.progress)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not cfg.progress or not extract)
    todo, ended = list(pending), set()
    try:
        while todo:
            todo = _run_loader(cfg, todo, fp, encoder, writer, out, ended, slides_bar, tiles_bar)
            if result.stopped:
                break
    finally:
        slides_bar.close()
        tiles_bar.close()
        for t in pending:  # locks this process still holds (interrupted run)
            release_lock(out / LOCKS_DIR / f"{t.slide_id}.lock", os.getpid())
    return result


def _consume(cfg: PreprocessConfig, it: Iterator[dict[str, Any]], writer: _Writer, ended: set[int],
             slides_bar: Any, tiles_bar: Any) -> list[SlideTask]:
    for msg in it:
        if msg["kind"] == "tiles":
            tiles_bar.update(writer.tiles(msg))
            tiles_bar.set_postfix_str(writer.tasks[msg["slide"]].slide_id, refresh=False)
            continue
        status = writer.end(msg)
        ended.add(msg["slide"])
        slides_bar.update(1)
        if cfg.fail_fast and status in FAIL_FAST_STATUSES:
            writer.result.stopped = (f"--fail-fast: {writer.tasks[msg['slide']].slide_id} ended with status "
                                     f"{status}: {msg['message']}")
            return []
    return []


def _run_loader(cfg: PreprocessConfig, todo: list[SlideTask], fp: dict[str, Any], encoder: Encoder | None,
                writer: _Writer, out: Path, ended: set[int], slides_bar: Any, tiles_bar: Any) -> list[SlideTask]:
    """One DataLoader over ``todo``. Returns the slides still to do: [] normally; after a worker died, the
    unfinished slides except the dead worker's (which are recorded as ``error``)."""
    workers = min(cfg.workers, len(todo))
    stream = SlideStream(todo, cfg, fp, os.getpid(), out, workers=workers)
    cuda = encoder is not None and encoder.device.type == "cuda"
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, collate_fn=_identity, **_loader_kwargs())
    it = iter(loader)  # starts the workers (and installs torch's SIGCHLD handler once per process)
    with _quiet_sigchld():  # ... which is muted while we consume the loader
        try:
            return _consume(cfg, it, writer, ended, slides_bar, tiles_bar)
        except RuntimeError as e:
            pids = _dead_worker_pids(e)
            if pids is None or workers == 0:
                raise
            dead = [i for i in stream.slides_of_dead_workers(pids) if i not in ended]
            if not dead:  # pids not found in the table: blame every slide still being read
                dead = [i for i in stream.slides_in_flight() if i not in ended]
            if not dead:
                raise SlideError(f"a DataLoader worker died ({e}) but no slide was being read") from e
            reason = str(e)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)  # join / terminate the workers now
            if shutdown is not None:
                shutdown()
    log.error("a slide reader process died (%s) while reading %s; recording it as error and going on",
              reason, ", ".join(writer.tasks[i].slide_id for i in dead))
    for i in dead:
        task = writer.tasks[i]
        writer.end({"kind": "end", "slide": i, "status": "error", "t0": time.time(),
                    "message": f"{task.path}: the reader process died while reading this slide ({reason}); "
                               "the file may crash the slide library (e.g. OpenSlide) - check or convert it"})
        ended.add(i)
        slides_bar.update(1)
    rest = [t for t in todo if t.index not in ended]
    for t in rest:  # their worker may have locked them and sent partial features: start them afresh
        writer.parts.pop(t.index, None)
        release_lock(out / LOCKS_DIR / f"{t.slide_id}.lock", os.getpid())
    log.warning("restarting the readers for %d unfinished slide(s)", len(rest))
    return rest
