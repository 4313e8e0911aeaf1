"""Which slides to do and whether a finished bag still matches: the slide list (``--slides``, ``--shard``,
``--mpp-csv``), and the settings fingerprints stored in bags and coords files for resume."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ncmi.data.bags import BagError, validate_bag

from .config import PreprocessConfig
from .discovery import find_slides
from .encoder_specs import resolve_spec
from .encoders import resolve_device
from .mpp import PLAUSIBLE_MPP, plausible_mpp
from .presets import kwargs_to_json
from .readers import (
    IMAGE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    SlideError,
    slide_id_of,
)
from .tissue import TissueParams

log = logging.getLogger(__name__)

__all__ = ["SlideTask", "plan_slides", "settings_fingerprint", "bag_mismatch", "tiling_fingerprint", "BAGS_DIR",
           "IMPLIED_SETTINGS",
           "THUMBS_DIR", "LOCKS_DIR", "COORDS_DIR", "STALE_DIR"]

BAGS_DIR, THUMBS_DIR, LOCKS_DIR, COORDS_DIR, STALE_DIR = "bags", "thumbnails", "locks", "coords", "stale"


def file_size(path: Path) -> int:
    return max(source_stat(path)[0], 0)


@dataclass(frozen=True)
class SlideTask:
    index: int
    slide_id: str
    path: Path
    mpp_override: float | None = None


# ----------------------------------------------------------------------------------------- settings
def tissue_params(cfg: PreprocessConfig) -> TissueParams:
    return TissueParams(seg_mpp=cfg.seg_mpp, method=cfg.tissue_method, threshold=cfg.tissue_threshold)


def _compute_precision(cfg: PreprocessConfig) -> str:
    if resolve_device(cfg.device).type != "cuda":
        return "fp32"
    if cfg.precision:
        return cfg.precision
    return resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size).precision


def tiling_fingerprint(cfg: PreprocessConfig) -> dict[str, Any]:
    """Everything that changes the tile grid of a slide; stored in ``coords/<id>.h5`` as ``tiling_json``."""
    return {
        "target_mpp": float(cfg.target_mpp),
        "patch_size": int(cfg.patch_size),
        "overlap": int(cfg.overlap),
        "min_tissue": float(cfg.min_tissue),
        "mpp_tolerance": float(cfg.mpp_tolerance),
        "tissue": tissue_params(cfg).to_dict(),
    }


def _encoder_settings(cfg: PreprocessConfig) -> dict[str, Any]:
    """The encoder's effective model kwargs and every preprocessing choice (preset, pooling, mean/std,
    input size, resize + crop, interpolation), after preset / timm defaults and overrides. Callables in the
    kwargs (e.g. ``timm.layers.SwiGLUPacked``) are recorded by their dotted names."""
    if "extract" not in cfg.stage_set:  # no encoder is built: record what was asked
        return {"encoder_kwargs": kwargs_to_json(cfg.encoder_kwargs_dict), "mean": cfg.mean, "std": cfg.std,
                "input_size": cfg.input_size}
    spec = resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size)
    return {"encoder_kwargs": json.loads(json.dumps(kwargs_to_json(spec.kwargs), sort_keys=True)),
            **spec.preprocessing()}


def settings_fingerprint(cfg: PreprocessConfig, weights_sha256: str) -> dict[str, Any]:
    """Everything that changes a bag's content; stored as ``settings_json`` and compared on resume."""
    return {
        "encoder": cfg.encoder,
        "weights_sha256": weights_sha256,
        **_encoder_settings(cfg),
        **tiling_fingerprint(cfg),
        "compute_precision": _compute_precision(cfg),
        "features_dtype": cfg.features_dtype,
        "read_path": cfg.read_path,
        "jpeg_decode": cfg.jpeg_decode,
    }


def source_stat(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a slide file; of a slide folder (DICOM WSI), its files' summed size and latest
    mtime; (-1, -1) when it cannot be read."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stats = [p.stat() for p in files]
    except OSError:
        return -1, -1
    return int(sum(st.st_size for st in stats)), int(max((st.st_mtime_ns for st in stats), default=0))


def source_mismatch(attrs: Any, task: SlideTask) -> str | None:
    """Why an output made from ``attrs`` no longer matches the slide file / mpp override, or None."""
    override = -1.0 if task.mpp_override is None else float(task.mpp_override)
    if float(attrs.get("mpp_override", -1.0)) != override:
        return f"mpp override changed: {attrs.get('mpp_override')} -> {override}"
    size, mtime = source_stat(task.path)
    if int(attrs.get("source_size", -2)) != size:
        return f"source file changed size: {attrs.get('source_size')} -> {size}"
    if int(attrs.get("source_mtime_ns", -2)) != mtime:
        return f"source file changed (modification time {attrs.get('source_mtime_ns')} -> {mtime} ns)"
    return None


# settings added to the fingerprint later -> the value that outputs made before them were made with
IMPLIED_SETTINGS: dict[str, Any] = {"read_path": "exact", "jpeg_decode": "cpu"}


def json_diff(stored_json: Any, wanted: dict[str, Any], what: str, implied: dict[str, Any] | None = None) -> str | None:
    try:
        stored = json.loads(stored_json or "{}")
    except (TypeError, ValueError):
        stored = {}
    if implied and isinstance(stored, dict):
        stored = {**implied, **stored}
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
    return (json_diff(attrs.get("settings_json"), fingerprint, "settings", IMPLIED_SETTINGS)
            or source_mismatch(attrs, task))


def _read_csv(path: str, flag: str) -> tuple[list[str], list[dict[str, str | None]]]:
    """Header and rows of a CSV given by ``flag``; clear errors naming the file (missing, not text, ...).

    UTF-8 with or without a byte-order mark (as Excel writes it) is accepted."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        raise SlideError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise SlideError(f"{flag} {path}: is a folder, expected a CSV file") from None
    except PermissionError:
        raise SlideError(f"{flag} {path}: permission denied; make the file readable") from None
    except UnicodeDecodeError as e:
        raise SlideError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as a UTF-8 "
                         "CSV (e.g. 'CSV UTF-8' in a spreadsheet program)") from None
    except (OSError, csv.Error) as e:
        raise SlideError(f"{flag} {path}: cannot read the CSV: {e}") from None


def _read_mpp_csv(path: str | None) -> dict[str, float]:
    """``{slide_id: mpp}`` of ``--mpp-csv``. Rows repeating a slide with the same value are fine; a slide
    given two different values is an error (which one is right cannot be known)."""
    if not path:
        return {}
    header, rows = _read_csv(path, "--mpp-csv")
    if not {"slide_id", "mpp"} <= set(header):
        raise SlideError(f"--mpp-csv {path}: needs columns slide_id,mpp (has {header})")
    out: dict[str, float] = {}
    line_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        sid, raw = (row.get("slide_id") or "").strip(), row.get("mpp")
        if not sid:
            raise SlideError(f"--mpp-csv {path}: line {line} has no slide_id")
        if raw is None or not raw.strip():
            raise SlideError(f"--mpp-csv {path}: line {line} ({sid}) has no mpp value; expected slide_id,mpp")
        try:
            v = float(raw)
        except ValueError:
            raise SlideError(f"--mpp-csv {path}: bad mpp {raw!r} for {sid} (line {line})") from None
        if not math.isfinite(v) or v <= 0:
            raise SlideError(f"--mpp-csv {path}: mpp must be a finite number > 0 for {sid} (line {line}), "
                             f"got {raw.strip()!r}")
        if sid in out:
            if out[sid] != v:
                raise SlideError(f"--mpp-csv {path}: slide {sid!r} has two different mpp values, {out[sid]:g} "
                                 f"(line {line_of[sid]}) and {v:g} (line {line}); keep one row per slide")
            continue
        if not plausible_mpp(v):
            log.warning("--mpp-csv %s: mpp %g for %s is outside the usual %s µm/px; used as given",
                        path, v, sid, PLAUSIBLE_MPP)
        out[sid], line_of[sid] = v, line
    return out


def _read_slide_list(path: str | None) -> set[str] | None:
    if not path:
        return None
    header, rows = _read_csv(path, "--slides")
    col = next((c for c in ("slide_id", "path", "slide") if c in header), None)
    if col is None:
        raise SlideError(f"--slides {path}: needs a slide_id (or path) column (has {header})")
    return {slide_id_of(v) if col == "path" else v for r in rows if (v := (r.get(col) or "").strip())}


def plan_slides(cfg: PreprocessConfig) -> list[SlideTask]:
    """The sorted slide list of this shard, restricted by ``--slides``, with ``--mpp-csv`` overrides.

    Plain images (png/jpg) are slides only when ``--mpp-csv`` has their mpp or ``--slides`` lists them;
    others are ignored with a warning (so stray pictures in a slide folder do not fail the run).
    """
    wanted = _read_slide_list(cfg.slides)
    mpps = _read_mpp_csv(cfg.mpp_csv)
    out = Path(cfg.output)  # the output folder (or its sub-folders when it is --input itself) is not searched
    exclude = [out / d for d in (BAGS_DIR, THUMBS_DIR, LOCKS_DIR, COORDS_DIR, STALE_DIR)] + [out]
    paths = find_slides(cfg.input, exclude=exclude)
    if not paths:
        raise SlideError(f"--input {cfg.input}: no slides found in this folder (searched recursively for "
                         f"{', '.join(SLIDE_EXTENSIONS)} and DICOM WSI folders); check the path")
    if wanted is not None:
        missing = wanted - {slide_id_of(p) for p in paths}
        if missing:
            log.warning("--slides lists %d slide(s) not found under %s: %s", len(missing), cfg.input,
                        sorted(missing)[:5])
        paths = [p for p in paths if slide_id_of(p) in wanted]
        if not paths:
            raise SlideError(f"--slides {cfg.slides}: none of its {len(wanted)} slide(s) is in {cfg.input}")
    else:  # a png/jpg in a slide folder is a slide only when the user gave its mpp
        images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and slide_id_of(p) not in mpps]
        if images:
            log.warning("ignoring %d plain image(s) without a --mpp-csv row (a png/jpg is a slide only with its "
                        "mpp there, or when --slides lists it): %s", len(images), ", ".join(p.name for p in images[:5]))
            skip = set(images)
            paths = [p for p in paths if p not in skip]
            if not paths:
                raise SlideError(f"--input {cfg.input}: no slides found in this folder, only plain images; give "
                                 "their mpp with --mpp-csv to process them as slides")
    i, n = cfg.shard_index
    paths = [p for k, p in enumerate(paths) if k % n == i]
    return [SlideTask(k, slide_id_of(p), p, mpps.get(slide_id_of(p))) for k, p in enumerate(paths)]


