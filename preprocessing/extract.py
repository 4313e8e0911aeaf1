"""The pipeline: slides → tissue → tiles → features → one HDF5 bag per slide, resumable and shareable.

Design (one DataLoader for the whole run):

* ``SlideStream`` is an ``IterableDataset`` over the pending slides. DataLoader worker ``w`` of ``W``
  owns slides ``w, w+W, ...``: it takes the slide's lock, opens the slide once, segments tissue, plans
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

``workers=0`` runs the same stream in the main process (no read-ahead) — used by the tests.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsi_ncmi.data.bags import BagError, validate_bag, write_bag

from .config import PreprocessConfig
from .encoders import RANDOM, Encoder, build_encoder, get_spec, resolve_device, sha256_file
from .locks import HOST, release_lock, try_lock
from .manifest import Manifest, summary_table
from .readers import SlideError, TileReadError, UnreadableSlideError, find_slides, open_slide, slide_id_of
from .tiling import MppTooCoarseError, TilePlan, grid_coords, plan_tiles
from .tissue import TissueMask, TissueParams, draw_overview, segment_tissue, tile_fractions

log = logging.getLogger(__name__)

__all__ = ["SlideTask", "RunResult", "run", "plan_slides", "settings_fingerprint", "bag_mismatch",
           "read_tile", "BAGS_DIR", "THUMBS_DIR", "LOCKS_DIR", "COORDS_DIR"]

BAGS_DIR, THUMBS_DIR, LOCKS_DIR, COORDS_DIR = "bags", "thumbnails", "locks", "coords"
FAIL_FAST_STATUSES = ("unreadable", "error", "mpp_missing")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


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

    def summary(self) -> str:
        return summary_table(self.statuses)


# ----------------------------------------------------------------------------------------- settings
def _tissue_params(cfg: PreprocessConfig) -> TissueParams:
    return TissueParams(seg_mpp=cfg.seg_mpp, method=cfg.tissue_method, threshold=cfg.tissue_threshold)


def _compute_precision(cfg: PreprocessConfig) -> str:
    return cfg.precision if resolve_device(cfg.device).type == "cuda" else "fp32"


def settings_fingerprint(cfg: PreprocessConfig, weights_sha256: str) -> dict[str, Any]:
    """Everything that changes a bag's content; stored as ``settings_json`` and compared on resume."""
    return {
        "encoder": cfg.encoder,
        "weights_sha256": weights_sha256,
        "target_mpp": float(cfg.target_mpp),
        "patch_size": int(cfg.patch_size),
        "overlap": int(cfg.overlap),
        "min_tissue": float(cfg.min_tissue),
        "compute_precision": _compute_precision(cfg),
        "features_dtype": cfg.features_dtype,
        "mpp_tolerance": float(cfg.mpp_tolerance),
        "tissue": _tissue_params(cfg).to_dict(),
    }


def bag_mismatch(path: Path, fingerprint: dict[str, Any], task: SlideTask) -> str | None:
    """None when the bag at ``path`` is valid and was made with these settings, else the reason."""
    if not path.is_file():
        return "no bag yet"
    try:
        info = validate_bag(path, check_values=False)
    except BagError as e:
        return f"invalid bag: {e}"
    attrs = info["attrs"]
    try:
        stored = json.loads(attrs.get("settings_json", "{}"))
    except ValueError:
        stored = {}
    diff = sorted(k for k in set(fingerprint) | set(stored) if stored.get(k) != fingerprint.get(k))
    if diff:
        return "settings changed: " + ", ".join(f"{k} {stored.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
    override = -1.0 if task.mpp_override is None else float(task.mpp_override)
    if float(attrs.get("mpp_override", -1.0)) != override:
        return f"mpp override changed: {attrs.get('mpp_override')} -> {override}"
    try:
        size = task.path.stat().st_size
    except OSError:
        size = -1
    if int(attrs.get("source_size", -2)) != size:
        return f"source file changed size: {attrs.get('source_size')} -> {size}"
    return None


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
    """The sorted slide list of this shard, restricted by ``--slides``, with ``--mpp-csv`` overrides."""
    paths = find_slides(cfg.input)
    wanted = _read_slide_list(cfg.slides)
    mpps = _read_mpp_csv(cfg.mpp_csv)
    if wanted is not None:
        missing = wanted - {slide_id_of(p) for p in paths}
        if missing:
            log.warning("--slides lists %d slide(s) not found under %s: %s", len(missing), cfg.input,
                        sorted(missing)[:5])
        paths = [p for p in paths if slide_id_of(p) in wanted]
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
                 owner_pid: int, out_dir: Path):
        self.tasks, self.cfg, self.fingerprint = tasks, cfg, fingerprint
        self.owner_pid, self.out = owner_pid, out_dir

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for task in self.tasks[wid::nw]:
            yield from self._slide(task)

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
        except MppTooCoarseError as e:
            yield self._end(task, "error", f"{task.path}: {e}", t0=t0)
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
                yield self._end(task, "mpp_missing", f"{task.path}: the slide has no pixel size (mpp); add a row "
                                f"'{task.slide_id},<mpp>' to a CSV with header slide_id,mpp and pass --mpp-csv",
                                t0=t0, geo=geo)
                return
            plan = plan_tiles(reader.mpp, reader.level_downsamples, cfg.target_mpp, cfg.patch_size, cfg.overlap,
                              cfg.mpp_tolerance)
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
            thumbs = self.out / THUMBS_DIR
            thumbs.mkdir(parents=True, exist_ok=True)
            overview = draw_overview(thumb, tm, coords, plan.patch_size_level0)
            tmp = thumbs / f"{task.slide_id}.tmp.png"
            cv2.imwrite(str(tmp), cv2.cvtColor(overview, cv2.COLOR_RGB2BGR))
            os.replace(tmp, thumbs / f"{task.slide_id}.png")
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
        return {
            "slide_id": task.slide_id, "source_path": str(task.path), "source_size": task.path.stat().st_size,
            "slide_mpp": plan.slide_mpp, "target_mpp": plan.target_mpp, "effective_mpp": plan.effective_mpp,
            "encoder": self.cfg.encoder, "weights_sha256": self.fp["weights_sha256"],
            "embed_dim": enc.embed_dim if enc else None,
            "compute_precision": self.fp["compute_precision"],
            "normalization": enc.normalization if enc else "", "patch_size_px": plan.patch_size,
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords.astype(np.int64))
            for k, v in coords_attrs.items():
                ds.attrs[k] = v
            f.create_dataset("tissue_fraction", data=frac.astype(np.float32))
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = v
        os.replace(tmp, path)


def _identity(msg: dict[str, Any]) -> dict[str, Any]:
    return msg  # no default_convert: numpy arrays and plans travel as they are


def _weights_sha(cfg: PreprocessConfig) -> str:
    if cfg.weights is None:
        return ""
    return RANDOM if cfg.weights == RANDOM else sha256_file(cfg.weights)


def run(cfg: PreprocessConfig) -> RunResult:
    """Process every pending slide of ``cfg``; returns statuses (also in ``OUT/manifest.csv``)."""
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_slides(cfg)
    result = RunResult()
    extract = "extract" in cfg.stage_set
    if extract:
        get_spec(cfg.encoder)  # unknown names fail before any slide work
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
    encoder = build_encoder(cfg.encoder, cfg.weights, cfg.device, cfg.precision, cfg.compile) if extract else None
    writer = _Writer(cfg, pending, fp, encoder, out, result)
    stream = SlideStream(pending, cfg, fp, os.getpid(), out)
    workers = min(cfg.workers, len(pending))
    cuda = encoder is not None and encoder.device.type == "cuda"
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, in_order=False, collate_fn=_identity)
    from tqdm.auto import tqdm

    slides_bar = tqdm(total=len(pending), desc="slides", unit="slide", disable=not cfg.progress)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not cfg.progress or not extract)
    try:
        for msg in loader:
            if msg["kind"] == "tiles":
                tiles_bar.update(writer.tiles(msg))
                tiles_bar.set_postfix_str(pending[msg["slide"]].slide_id, refresh=False)
                continue
            status = writer.end(msg)
            slides_bar.update(1)
            if cfg.fail_fast and status in FAIL_FAST_STATUSES:
                raise SlideError(f"--fail-fast: {pending[msg['slide']].slide_id} ended with status {status}: "
                                 f"{msg['message']}")
    finally:
        slides_bar.close()
        tiles_bar.close()
        for t in pending:  # locks this process still holds (interrupted run)
            release_lock(out / LOCKS_DIR / f"{t.slide_id}.lock", os.getpid())
    return result
