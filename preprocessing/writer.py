"""The main process's side of each slide: its features until the slide ends, then the bag (or, without the
extract stage, the coords file), the previous bag retired to ``stale/`` when a redo fails, the manifest row
and the lock release; and :class:`RunResult`, the run's record of all that.

:func:`preprocessing.extract.run` feeds a :class:`SlideWriter` the messages of the reading side
(:mod:`preprocessing.stream`): ``tiles`` batches (encoded here, features kept on the device) and one ``end``
per slide.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ncmi.data.atomic import fit_name
from wsi_ncmi.data.bags import write_bag

from .config import PreprocessConfig
from .encoders import Encoder
from .locks import HOST, release_lock
from .manifest import Manifest, atomic_path, summary_table
from .outdir import FolderSettingsError, check_free_space, disk_full_message, is_disk_full, verify_folder
from .plan import BAGS_DIR, COORDS_DIR, LOCKS_DIR, STALE_DIR, SlideTask, source_stat, tiling_fingerprint
from .presets import kwargs_to_json
from .tiling import TilePlan

log = logging.getLogger(__name__)

__all__ = ["FAILED_STATUSES", "RETIRE_BAG_STATUSES", "RunResult", "SlideWriter", "free_name", "retire_all_bags"]

FAILED_STATUSES = ("unreadable", "error", "mpp_missing")  # a run with any of these exits non-zero
# outcomes after which a previous bag of the slide no longer describes it: moved to STALE_DIR
RETIRE_BAG_STATUSES = ("unreadable", "error", "mpp_missing", "no_tissue")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


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


class SlideWriter:
    """Main-process side: features per slide, bag / manifest writing, lock release."""

    def __init__(self, cfg: PreprocessConfig, tasks: list[SlideTask], fingerprint: dict[str, Any],
                 encoder: Encoder | None, out: Path, result: RunResult, folder: dict[str, Any] | None = None):
        self.cfg, self.tasks, self.fp, self.encoder, self.out, self.result = cfg, tasks, fingerprint, encoder, out, result
        self.folder = folder  # the folder-wide settings this run claimed (re-checked before each write)
        self.writing: Path | None = None  # the file being written
        self.stop_reasons: list[str] = []  # why the run stops after the current slide (RunResult.stopped)
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
        keep_bag, self.writing = False, None
        try:
            status, message, n, nbad = self._finish(task, msg, parts)
        except FolderSettingsError as e:
            status, message, n, nbad = "error", str(e), 0, 0
            self._stop(str(e))
            keep_bag = True
        except Exception as e:  # e.g. a write failure: record and go on (a full disk: stop after this slide)
            if is_disk_full(e):
                where = getattr(e, "filename", None) or self.writing or self.out
                status, message, n, nbad = "error", disk_full_message(where, e), 0, 0
                self._stop(f"disk full: {message}")
                keep_bag = True
            else:
                log.error("%s: %s\n%s", task.slide_id, e, traceback.format_exc())
                status, message, n, nbad = "error", f"{type(e).__name__}: {e}", 0, 0
        if msg.get("stop"):  # the reading side hit a full disk (thumbnail, lock) or could not lock
            self._stop(f"disk full: {message}" if msg.get("disk_full") else message)
            keep_bag = True
        try:  # a full disk or a changed folder says nothing about the slide: its previous bag stays
            if status in RETIRE_BAG_STATUSES and not msg.get("done") and not keep_bag:
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
        self.result.statuses[task.slide_id] = status
        if message:
            self.result.messages[task.slide_id] = message
        try:
            self.manifest.update(row, keep_ok=bool(msg.get("done")))
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._stop(f"{'' if self.stop_reasons else 'disk full: '}{disk_full_message(self.manifest.path, e)}; "
                       f"{task.slide_id} ended {status} but its manifest row could not be written")
        (log.info if status in ("ok", "skipped") else log.warning)(
            "%s: %s %s", task.slide_id, status, message or f"({n} tiles, {nbad} bad)")
        return status

    def _stop(self, why: str) -> None:
        """Stop the run after this slide (a full disk fails every next slide too); later reasons are added."""
        self.stop_reasons.append(why)
        first = self.stop_reasons[0]
        hint = "free space, then rerun the same command" if first.startswith("disk full") else "fix it, then rerun"
        self.result.stopped = (f"{'; '.join(self.stop_reasons)}; the run stopped here ({hint}: finished slides are "
                               "kept and skipped)")
        log.error("%s", why)

    def _retire_bag(self, task: SlideTask, status: str) -> Path | None:
        """Move ``bags/<id>.h5`` (made earlier, with other settings or another file) to ``stale/<id>.h5``, or
        to ``stale/<id>.<UTC time>.h5`` when an earlier retired bag is there already (never overwritten)."""
        bag = self.out / BAGS_DIR / f"{task.slide_id}.h5"
        if not bag.is_file():
            return None
        dst = free_name(self.out / STALE_DIR, task.slide_id, ".h5")
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
        bag = self.out / BAGS_DIR / f"{task.slide_id}.h5"
        self._before_write(bag, feats.numel() * feats.element_size() + 16 * len(index))
        write_bag(bag, feats.numpy(), coords[index], attrs, tissue_fraction=msg["tissue_fraction"][index],
                  coords_attrs=coords_attrs)
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

    def _before_write(self, path: Path, data_bytes: int) -> None:
        """The folder still records this run's settings, and the disk has room for the file (+ 64 kB of HDF5
        headers and the manifest); else OSError(ENOSPC) / FolderSettingsError before anything is written."""
        self.writing = path  # named by a disk-full error that does not carry a file name
        if self.folder is not None:
            verify_folder(self.out, self.folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(path, data_bytes + (1 << 16))

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
        self._before_write(path, 20 * len(coords))
        buf = io.BytesIO()  # built in memory, then plain writes: a full disk never fails inside HDF5
        with h5py.File(buf, "w") as f:
            ds = f.create_dataset("coords", data=coords.astype(np.int64))
            for k, v in coords_attrs.items():
                ds.attrs[k] = v
            f.create_dataset("tissue_fraction", data=frac.astype(np.float32))
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = v
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())


def retire_all_bags(out: Path, keep: set[str]) -> list[Path]:
    """Move every ``bags/*.h5`` but those of ``keep`` (slides this run redoes: replaced, or retired when their
    redo fails) to ``stale/``, never overwriting a retired bag: the folder's settings changed (``--overwrite``),
    so no bag made with the old ones may stay where training reads bags."""
    moved = []
    for bag in sorted((out / BAGS_DIR).glob("*.h5")):
        if bag.stem in keep:
            continue
        dst = free_name(out / STALE_DIR, bag.stem, ".h5")
        os.replace(bag, dst)
        moved.append(dst)
    if moved:
        log.warning("%s: moved %d bag(s) made with the folder's previous settings to %s", out, len(moved),
                    out / STALE_DIR)
    return moved


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/<stem><suffix>``, or ``folder/<stem>.<UTC time>[-k]<suffix>`` when that is taken: a path no
    file has, so moving a file there never overwrites one (the caller holds the slide's lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / fit_name(stem, suffix)
    if not os.path.lexists(dst):
        return dst
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    k = 0
    while os.path.lexists(dst := folder / fit_name(f"{stem}.{stamp}{f'-{k}' if k else ''}", suffix)):
        k += 1
    return dst
