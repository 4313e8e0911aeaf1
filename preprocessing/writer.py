"""The main process's side of each slide: its features until the slide ends, then the bag (or, without the
extract stage, the coords file), the previous bag retired to ``stale/`` when a redo fails, the manifest row
and the lock release; and :class:`RunResult`, the run's record of all that.

:func:`preprocessing.extract.run` feeds a :class:`SlideWriter` the messages of the reading side
(:mod:`preprocessing.stream`): ``tiles`` batches (encoded here, features kept on the device) and one ``end``
per slide.
"""

from __future__ import annotations

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

from wsi_ncmi.data.bags import write_bag

from .config import PreprocessConfig
from .encoders import Encoder
from .locks import HOST, release_lock
from .manifest import Manifest, atomic_path, summary_table
from .plan import BAGS_DIR, COORDS_DIR, LOCKS_DIR, STALE_DIR, SlideTask, source_stat, tiling_fingerprint
from .presets import kwargs_to_json
from .tiling import TilePlan

log = logging.getLogger(__name__)

__all__ = ["FAILED_STATUSES", "RETIRE_BAG_STATUSES", "RunResult", "SlideWriter", "free_name"]

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


def free_name(folder: Path, stem: str, suffix: str) -> Path:
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
