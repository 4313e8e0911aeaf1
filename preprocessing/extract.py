"""The pipeline: slides → tissue → tiles → features → one HDF5 bag per slide, resumable and shareable.

Design (one DataLoader for the whole run). Modules: :mod:`preprocessing.plan` (the slide list and the
settings fingerprints used for resume), :mod:`preprocessing.stream` (the reading side, ``SlideStream``) and
this one (the main loop: encoder, bag and manifest writing, lock release, recovery from dead workers).

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
  previous bag moved from ``bags/`` to ``stale/<slide_id>.h5`` (``stale/<slide_id>.<UTC time>.h5`` when one is
  there already: a retired bag is never overwritten; logged, noted in the manifest message),
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

import inspect
import json
import logging
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

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsi_ncmi.data.bags import write_bag

from .config import PreprocessConfig
from .encoders import RANDOM, Encoder, build_encoder, check_recipe, resolve_spec, sha256_file
from .locks import HOST, release_lock
from .manifest import MISSING_SOURCE, Manifest, atomic_path, summary_table
from .plan import (
    BAGS_DIR,
    COORDS_DIR,
    LOCKS_DIR,
    STALE_DIR,
    THUMBS_DIR,
    SlideTask,
    bag_mismatch,
    plan_slides,
    settings_fingerprint,
    source_stat,
    tiling_fingerprint,
)
from .presets import kwargs_to_json
from .readers import SlideError
from .stream import SlideStream, read_tile
from .tiling import TilePlan

log = logging.getLogger(__name__)

FAILED_STATUSES = ("unreadable", "error", "mpp_missing")  # a run with any of these exits non-zero
FAIL_FAST_STATUSES = FAILED_STATUSES
# outcomes after which a previous bag of the slide no longer describes it: moved to STALE_DIR
RETIRE_BAG_STATUSES = ("unreadable", "error", "mpp_missing", "no_tissue")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}

__all__ = ["SlideTask", "RunResult", "run", "plan_slides", "settings_fingerprint", "bag_mismatch",
           "tiling_fingerprint", "read_tile", "SlideStream", "BAGS_DIR", "THUMBS_DIR", "LOCKS_DIR", "COORDS_DIR",
           "STALE_DIR", "FAILED_STATUSES"]


@dataclass
class RunResult:
    statuses: dict[str, str] = field(default_factory=dict)  # slide_id -> status
    written: list[str] = field(default_factory=list)  # bags written by this process
    locked: list[str] = field(default_factory=list)  # slides another process was working on
    missing_source: list[str] = field(default_factory=list)  # manifest rows whose slide file is gone
    messages: dict[str, str] = field(default_factory=dict)  # slide_id -> manifest message (when not empty)
    stopped: str = ""  # why the run stopped before the end (--fail-fast), "" when it did not

    def summary(self) -> str:
        return summary_table(self.statuses)

    def failed(self) -> list[str]:
        """Slides that ended error / unreadable / mpp_missing (no_tissue is not a failure)."""
        return sorted(k for k, v in self.statuses.items() if v in FAILED_STATUSES)


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
        if message:
            self.result.messages[task.slide_id] = message
        (log.info if status in ("ok", "skipped") else log.warning)(
            "%s: %s %s", task.slide_id, status, message or f"({n} tiles, {nbad} bad)")
        return status

    def _retire_bag(self, task: SlideTask, status: str) -> Path | None:
        """Move ``bags/<id>.h5`` (made earlier, with other settings or another file) to ``stale/<id>.h5``, or
        to ``stale/<id>.<UTC time>.h5`` when an earlier retired bag is there already (never overwritten)."""
        bag = self.out / BAGS_DIR / f"{task.slide_id}.h5"
        if not bag.is_file():
            return None
        dst = _free_name(self.out / STALE_DIR, task.slide_id, ".h5")
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
        size, mtime = source_stat(task.path)
        return {
            "slide_id": task.slide_id, "source_path": str(task.path), "source_size": size,
            "source_mtime_ns": mtime,
            "slide_mpp": plan.slide_mpp, "target_mpp": plan.target_mpp, "effective_mpp": plan.effective_mpp,
            "encoder": self.cfg.encoder, "weights_sha256": self.fp["weights_sha256"],
            "embed_dim": enc.embed_dim if enc else None,
            "compute_precision": self.fp["compute_precision"],
            "normalization": enc.normalization if enc else "", "patch_size_px": plan.patch_size,
            "encoder_kwargs": json.dumps(kwargs_to_json(enc.kwargs) if enc else self.fp.get("encoder_kwargs", {}),
                                         sort_keys=True),
            "encoder_arch": enc.arch if enc else "",
            "encoder_preset": (enc.preset or "") if enc else "", "pooling": enc.pooling if enc else "",
            "preprocessing_json": json.dumps(enc.preprocessing if enc else {}, sort_keys=True),
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


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/<stem><suffix>``, or ``folder/<stem>.<UTC time>[-k]<suffix>`` when that is taken: a path no
    file has, so moving a file there never overwrites one (the caller holds the slide's lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{stem}{suffix}"
    if not os.path.lexists(dst):
        return dst
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    k = 0
    while os.path.lexists(dst := folder / f"{stem}.{stamp}{f'-{k}' if k else ''}{suffix}"):
        k += 1
    return dst


def _mark_missing_sources(manifest: Manifest, planned: set[str], input_dir: str) -> list[str]:
    """Rows of slides under ``input_dir`` that this run did not find and whose file no longer exists become
    ``missing_source`` (their bags are left where they are); returns their slide ids. Rows of other input
    folders (several runs can share one output folder) are left alone."""
    root = os.path.abspath(input_dir)

    def gone_from_input(path: str) -> bool:
        p = os.path.abspath(path)
        return os.path.commonpath([p, root]) == root and not os.path.lexists(p)

    gone = [row for sid, row in manifest.rows().items()
            if sid not in planned and row.get("status") != MISSING_SOURCE and row.get("path")
            and gone_from_input(row["path"])]
    if not gone:
        return []
    marked = []
    for row in gone:
        was = row.get("status", "")
        kept = f"; its bag {BAGS_DIR}/{row['slide_id']}.h5 is kept" if was == "ok" else ""
        marked.append({**row, "status": MISSING_SOURCE,
                       "message": f"{row['path']}: the slide file is gone (deleted or moved); status was {was}{kept}"})
        log.warning("%s: the slide file %s is gone (deleted or moved); marked %s in %s",
                    row["slide_id"], row["path"], MISSING_SOURCE, manifest.path)
    manifest.update_many(marked)
    return [r["slide_id"] for r in gone]


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
    if out.exists() and not out.is_dir():
        raise SlideError(f"--output {out}: exists and is not a folder; give a folder path (it is created if "
                         "needed)")
    tasks = plan_slides(cfg)  # reads --input, --slides and --mpp-csv: their errors come before any output
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlideError(f"--output {out}: cannot create the folder: {e.strerror or e}") from None
    result = RunResult()
    extract = "extract" in cfg.stage_set
    if extract:
        # unknown names / bad overrides fail before any slide work; tiles off the published recipe are warned about
        check_recipe(resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size),
                     cfg.patch_size, cfg.target_mpp)
        if cfg.weights is None:
            build_encoder(cfg.encoder, None)  # raises the clear "needs --weights" error
    fp = settings_fingerprint(cfg, _weights_sha(cfg))
    manifest = Manifest(out / "manifest.csv")
    result.missing_source = _mark_missing_sources(manifest, {t.slide_id for t in tasks}, cfg.input)
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
