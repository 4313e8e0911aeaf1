"""The HDF5 bag: one file per slide holding patch features, their coordinates and provenance.

Schema (``SCHEMA_VERSION = 1``), file ``<slide_id>.h5``:

- ``features`` [N, D] float16 or float32, chunked (min(N, 1024), D)
- ``coords`` [N, 2] int64, level-0 top-left (x, y); attrs ``patch_size``, ``patch_level``,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification`` (the names CLAM/TRIDENT use)
- ``tissue_fraction`` [N] float32 (optional)
- root attrs: ``schema_version``, ``slide_id``, ``source_path``, ``source_size``, ``slide_mpp``, ``target_mpp``,
  ``effective_mpp``, ``encoder``, ``weights_sha256``, ``embed_dim``, ``precision``, ``normalization``, ``created_by``

A bag is built in memory, written to ``<slide_id>.h5.tmp`` (fsync'ed) and renamed with ``os.replace``, so a
killed writer leaves a ``.tmp`` file and never a half-written ``.h5``, and a full disk is a plain ``OSError``.

Readers also accept feature files written by CLAM (``features`` + ``coords``, no attributes) and TRIDENT
(``features`` + ``coords`` with attributes on the datasets).

This file holds one concept, the bag file format (write, read, inspect, validate and list bags of the schema
above), and is longer than the ~450-line guideline on purpose: splitting the writer from its readers and
validators would spread one schema over several files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_ncmi import __version__
from wsi_ncmi.data.atomic import fit_name
from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FEATURES = "features"
COORDS = "coords"
TISSUE = "tissue_fraction"
TMP_SUFFIX = ".tmp"
CHUNK_ROWS = 1024
FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
COORDS_ATTR_KEYS = (
    "patch_size",
    "patch_level",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
)
ROOT_ATTR_KEYS = (
    "schema_version",
    "slide_id",
    "source_path",
    "source_size",
    "slide_mpp",
    "target_mpp",
    "effective_mpp",
    "encoder",
    "weights_sha256",
    "embed_dim",
    "precision",
    "normalization",
    "created_by",
)
FORMATS = ("wsi_ncmi", "clam", "trident")


class BagError(UserError):
    """A bag file is missing, unreadable or does not follow the schema; the message names the file."""


class LazyFeatures:
    """A read-on-demand view of a bag's ``features`` dataset: ``shape``, ``dtype``, slicing, ``np.asarray``.

    The file is opened for each access, so the object is safe to send to DataLoader worker processes.
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, squeeze_leading: bool = False):
        self.path = Path(path)
        self.shape = shape
        self.dtype = dtype
        self._squeeze_leading = squeeze_leading

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[FEATURES]
                return ds[0][index] if self._squeeze_leading else ds[index]
        except (OSError, KeyError) as exc:
            raise BagError(f"{self.path}: cannot read features: {exc}") from exc

    def read(self) -> np.ndarray:
        """All rows, [N, D] in the stored dtype."""
        return self[:]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.read()
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyFeatures({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass
class Bag:
    """One slide's bag as read from disk."""

    path: Path
    slide_id: str
    features: np.ndarray | LazyFeatures  # [N, D]
    coords: np.ndarray  # [N, 2] int64, level-0 (x, y)
    tissue_fraction: np.ndarray | None = None  # [N] or None
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    format: str = "wsi_ncmi"

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# ----------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any, what: str, path: Path) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            raise BagError(f"{path}: {what} is bfloat16; HDF5 has no bfloat16, cast to float16 or float32 first")
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything unconvertible is a user error
        raise BagError(f"{path}: {what} cannot be converted to an array: {exc}") from exc


def _attr_value(value: Any) -> Any:
    """A Python value as something h5py stores as an attribute (None means: do not store)."""
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, Mapping):
        return json.dumps(dict(value), default=str)
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
        return json.dumps([str(v) for v in np.asarray(value).ravel().tolist()])
    return str(value)


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    return {str(k): _from_attr(v) for k, v in obj.attrs.items()}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _slide_id_from_path(path: Path) -> str:
    name = path.name
    return name[: -len(".h5")] if name.endswith(".h5") else path.stem


# ------------------------------------------------------------------------------------------------ write
def _check_arrays(
    path: Path, features: np.ndarray, coords: np.ndarray, tissue: np.ndarray | None, check_values: bool
) -> None:
    if features.ndim != 2:
        raise BagError(f"{path}: features must be [N, D], got shape {features.shape}")
    if features.dtype not in FEATURE_DTYPES:
        raise BagError(f"{path}: features dtype must be float16 or float32, got {features.dtype}")
    n, d = features.shape
    if n == 0 or d == 0:
        raise BagError(f"{path}: features are empty (shape {features.shape}); a bag needs at least one row")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise BagError(f"{path}: coords must be [N, 2], got shape {coords.shape}")
    if coords.dtype.kind not in "iu":
        raise BagError(f"{path}: coords must be integers (level-0 pixels), got {coords.dtype}")
    if coords.shape[0] != n:
        raise BagError(f"{path}: {n} feature rows but {coords.shape[0]} coords rows")
    if tissue is not None and tissue.shape != (n,):
        raise BagError(f"{path}: tissue_fraction must be [N]={n}, got shape {tissue.shape}")
    if check_values and not np.isfinite(features).all():
        raise BagError(f"{path}: features contain NaN or inf")


def write_bag(
    path: str | os.PathLike,
    features: Any,
    coords: Any,
    attrs: Mapping[str, Any] | None = None,
    tissue_fraction: Any = None,
    coords_attrs: Mapping[str, Any] | None = None,
    compression: str | None = None,
    check_values: bool = True,
) -> Path:
    """Write one slide's bag atomically and return its path.

    features [N, D] float16|float32 (numpy or torch), coords [N, 2] integer level-0 (x, y).
    ``attrs`` fills the root attributes (unknown keys are kept too); the ``coords`` attributes are taken
    from ``coords_attrs`` and, for keys it lacks, from ``attrs``. ``compression``: None, "gzip" or "lzf".
    Everything is validated before the file is created; on failure nothing is left behind.
    """
    path = Path(path)
    attrs = dict(attrs or {})
    feats = _to_numpy(features, "features", path)
    xy = _to_numpy(coords, "coords", path)
    tissue = None if tissue_fraction is None else _to_numpy(tissue_fraction, "tissue_fraction", path)
    _check_arrays(path, feats, xy, tissue, check_values)
    if compression not in (None, "gzip", "lzf"):
        raise BagError(f"{path}: compression must be None, 'gzip' or 'lzf', got {compression!r}")
    n, d = feats.shape

    root: dict[str, Any] = {k: v for k, v in attrs.items() if k not in COORDS_ATTR_KEYS}
    given_dim = root.get("embed_dim")
    if given_dim is not None and int(given_dim) != d:
        raise BagError(f"{path}: attrs embed_dim={given_dim} but features have D={d}")
    root.update(
        schema_version=SCHEMA_VERSION,
        slide_id=str(attrs.get("slide_id") or _slide_id_from_path(path)),
        embed_dim=d,
        precision=str(feats.dtype),
        created_by=f"wsi_ncmi {__version__}",
    )
    c_attrs = {k: attrs[k] for k in COORDS_ATTR_KEYS if k in attrs}
    c_attrs.update(coords_attrs or {})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(fit_name(path.stem, path.suffix + TMP_SUFFIX))  # <id>.h5.tmp, shortened if too long
    try:
        with open(tmp, "wb") as fh:  # created first: a killed writer leaves this .tmp, never a half-written .h5
            buf = io.BytesIO()  # built in memory: HDF5 never meets a failing disk (ENOSPC mid-write broke its state)
            with h5py.File(buf, "w") as f:
                f.create_dataset(FEATURES, data=feats, chunks=(min(n, CHUNK_ROWS), d), compression=compression)
                ds = f.create_dataset(COORDS, data=xy.astype(np.int64, copy=False))
                for key, value in c_attrs.items():
                    if (v := _attr_value(value)) is not None:
                        ds.attrs[key] = v
                if tissue is not None:
                    f.create_dataset(TISSUE, data=tissue.astype(np.float32, copy=False))
                for key, value in root.items():
                    if (v := _attr_value(value)) is not None:
                        f.attrs[str(key)] = v
            fh.write(buf.getbuffer())  # plain writes: a full disk is one OSError (ENOSPC)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    log.debug("wrote %s: %d x %d %s", path, n, d, feats.dtype)
    return path


# ------------------------------------------------------------------------------------------------- read
def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise BagError(f"{path}: no such bag file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc


def _detect_format(f: h5py.File) -> str:
    if "schema_version" in f.attrs:
        return "wsi_ncmi"
    has_ds_attrs = any(len(f[k].attrs) for k in (FEATURES, COORDS) if k in f)
    return "trident" if has_ds_attrs or len(f.attrs) else "clam"


def _features_layout(path: Path, f: h5py.File) -> tuple[h5py.Dataset, tuple[int, int], bool]:
    """The features dataset, its [N, D] shape and whether a leading singleton axis is squeezed."""
    if FEATURES not in f:
        raise BagError(f"{path}: missing dataset 'features' (has: {sorted(f.keys())})")
    ds = f[FEATURES]
    if not isinstance(ds, h5py.Dataset):
        raise BagError(f"{path}: 'features' is not a dataset")
    shape = tuple(int(s) for s in ds.shape)
    if len(shape) == 3 and shape[0] == 1:  # some extractors store [1, N, D]
        return ds, (shape[1], shape[2]), True
    if len(shape) != 2:
        raise BagError(f"{path}: features must be [N, D], got shape {shape}")
    return ds, (shape[0], shape[1]), False


def _read_coords(path: Path, f: h5py.File, n: int) -> np.ndarray:
    if COORDS not in f:
        raise BagError(f"{path}: missing dataset 'coords' (has: {sorted(f.keys())})")
    ds = f[COORDS]
    shape = tuple(ds.shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
        arr = ds[0]
    else:
        arr = ds[()]
    if len(shape) != 2 or shape[1] != 2:
        raise BagError(f"{path}: coords must be [N, 2], got shape {tuple(ds.shape)}")
    if shape[0] != n:
        raise BagError(f"{path}: {n} feature rows but {shape[0]} coords rows")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise BagError(f"{path}: coords are not integral (dtype {arr.dtype})")
    elif arr.dtype.kind not in "iu":
        raise BagError(f"{path}: coords must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def read_bag(path: str | os.PathLike, lazy: bool = False) -> Bag:
    """Read a bag (ours, CLAM or TRIDENT). ``lazy=True`` leaves features on disk (a ``LazyFeatures``)."""
    path = Path(path)
    try:
        with _open(path) as f:
            fmt = _detect_format(f)
            ds, shape, squeeze = _features_layout(path, f)
            if ds.dtype not in FEATURE_DTYPES and not (fmt != "wsi_ncmi" and ds.dtype.kind == "f"):
                raise BagError(f"{path}: features dtype must be float16 or float32, got {ds.dtype}")
            if shape[0] == 0:
                raise BagError(f"{path}: bag has zero rows")
            if lazy:
                features: np.ndarray | LazyFeatures = LazyFeatures(path, shape, ds.dtype, squeeze)
            else:
                features = ds[0] if squeeze else ds[()]
            coords = _read_coords(path, f, shape[0])
            tissue = None
            if TISSUE in f:
                tissue = np.asarray(f[TISSUE][()], dtype=np.float32)
                if tissue.shape != (shape[0],):
                    raise BagError(f"{path}: tissue_fraction has shape {tissue.shape}, expected ({shape[0]},)")
            attrs = _attrs_dict(f)
            coords_attrs = _attrs_dict(f[COORDS])
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot read bag (truncated or corrupt?): {exc}") from exc
    slide_id = str(attrs.get("slide_id") or _slide_id_from_path(path))
    return Bag(path, slide_id, features, coords, tissue, attrs, coords_attrs, fmt)


def _all_finite(arr: np.ndarray) -> bool:
    torch = sys.modules.get("torch")  # never imported here; used when the caller has it (the data loader)
    if arr.dtype == np.float16 and torch is not None:
        # numpy has no vectorised float16 isfinite (~10x slower than this); min/max propagate NaN and show ±inf
        lo, hi = torch.aminmax(torch.from_numpy(np.ascontiguousarray(arr)))
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    return bool(np.isfinite(arr).all())


def check_finite_features(path: str | os.PathLike, features: np.ndarray) -> None:
    """Raise :class:`BagError` naming ``path`` (and the rows) when ``features`` [N, D] hold NaN or inf.

    Costs about half a read from the page cache (20000 x 1024 float16: ~2 ms with torch loaded)."""
    arr = np.asarray(features)
    if arr.size == 0 or arr.dtype.kind != "f" or _all_finite(arr):
        return
    rows = np.nonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))[0]
    raise BagError(f"{path}: features contain NaN or inf in {len(rows)} row(s) (first at row {int(rows[0])}); "
                   "re-extract the slide (wsi-preprocess --overwrite) or drop it from the split table")


def read_features(path: str | os.PathLike, check_values: bool = True) -> np.ndarray:
    """Just the features [N, D] in their stored dtype: the fast path of the data loader.

    ``check_values``: a bag with NaN/inf features raises :class:`BagError` naming the file and the rows
    (:func:`check_finite_features`), instead of a model error without the bag's name later.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            ds, shape, squeeze = _features_layout(path, f)
            out = np.empty(shape, dtype=ds.dtype)
            if squeeze:
                out[...] = ds[0]
            elif shape[0]:
                ds.read_direct(out)
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot read features (truncated or corrupt?): {exc}") from exc
    if check_values:
        check_finite_features(path, out)
    return out


def read_header(path: str | os.PathLike) -> tuple[int, int, np.dtype]:
    """(N, D, dtype) of a bag's features without reading them."""
    path = Path(path)
    try:
        with _open(path) as f:
            ds, shape, _ = _features_layout(path, f)
            return shape[0], shape[1], ds.dtype
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot read header: {exc}") from exc


def check_header(path: str | os.PathLike) -> tuple[int, int, np.dtype]:
    """:func:`read_header` plus the checks a bag must pass before a model uses it (no feature data is read):
    floating-point features with at least one row, as many ``coords`` rows as feature rows (when it has coords),
    and a recorded ``slide_id`` equal to the file's name (a renamed or copied bag would be used as another
    slide). Raises :class:`BagError` naming the file and the problem."""
    path = Path(path)
    try:
        with _open(path) as f:
            ds, (n, d), _ = _features_layout(path, f)
            coords = f[COORDS] if COORDS in f else None
            n_coords = int(coords.shape[-2]) if isinstance(coords, h5py.Dataset) and coords.ndim >= 2 else None
            recorded = _from_attr(f.attrs["slide_id"]) if "slide_id" in f.attrs else None
            dtype = ds.dtype
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot read header: {exc}") from exc
    if dtype.kind != "f":
        raise BagError(f"{path}: features must be floating point (float16 or float32), got {dtype}; "
                       "re-extract the slide or convert the features")
    if n == 0:
        raise BagError(f"{path}: bag has zero rows (no tissue tile); re-extract the slide or drop it from the table")
    if n_coords is not None and n_coords != n:
        raise BagError(f"{path}: {n} feature rows but {n_coords} coords rows; the bag is inconsistent, re-extract "
                       "the slide")
    name = _slide_id_from_path(path)
    if recorded not in (None, "") and str(recorded) != name:
        raise BagError(f"{path}: the bag records slide_id {str(recorded)!r} but its file name says {name!r} "
                       f"(renamed or copied?); name it {recorded}.h5 or re-extract slide {name!r}")
    return n, d, dtype


# ---------------------------------------------------------------------------------- inspect / validate
def inspect_bag(path: str | os.PathLike) -> dict[str, Any]:
    """Schema and provenance of one bag from its header (no feature data is read)."""
    path = Path(path)
    try:
        with _open(path) as f:
            fmt = _detect_format(f)
            ds, shape, _ = _features_layout(path, f)
            dtype = ds.dtype
            attrs = _attrs_dict(f)
            coords_attrs = _attrs_dict(f[COORDS]) if COORDS in f else {}
            feature_attrs = _attrs_dict(ds)
            has_tissue = TISSUE in f
            n_coords = int(f[COORDS].shape[-2]) if COORDS in f and f[COORDS].ndim >= 2 else None
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot inspect bag: {exc}") from exc
    encoder = attrs.get("encoder") or feature_attrs.get("encoder") or feature_attrs.get("name")
    return {
        "path": str(path),
        "slide_id": str(attrs.get("slide_id") or _slide_id_from_path(path)),
        "format": fmt,
        "schema_version": attrs.get("schema_version"),
        "n": shape[0],
        "n_coords": n_coords,
        "dim": shape[1],
        "dtype": str(dtype),
        "encoder": encoder,
        "weights_sha256": attrs.get("weights_sha256"),
        "slide_mpp": attrs.get("slide_mpp"),
        "target_mpp": attrs.get("target_mpp"),
        "effective_mpp": attrs.get("effective_mpp"),
        "normalization": attrs.get("normalization"),
        "created_by": attrs.get("created_by"),
        "has_tissue_fraction": has_tissue,
        "attrs": attrs,
        "coords_attrs": coords_attrs,
    }


def validate_bag(path: str | os.PathLike, check_values: bool = True) -> dict[str, Any]:
    """Check a bag completely; return its ``inspect_bag`` dict or raise ``BagError`` naming the problem.

    Checks: readable HDF5, both datasets present, features [N, D] float16/float32 (float64 accepted for
    CLAM/TRIDENT files), coords [N, 2] integral, N > 0 and equal in both, schema version known, and with
    ``check_values`` no NaN/inf in features (read chunk by chunk).
    """
    path = Path(path)
    info = inspect_bag(path)
    if info["schema_version"] is not None and int(info["schema_version"]) > SCHEMA_VERSION:
        raise BagError(f"{path}: schema_version {info['schema_version']} is newer than {SCHEMA_VERSION}")
    if info["format"] == "wsi_ncmi" and info["dtype"] not in ("float16", "float32"):
        raise BagError(f"{path}: features dtype must be float16 or float32, got {info['dtype']}")
    if np.dtype(info["dtype"]).kind != "f":
        raise BagError(f"{path}: features must be floating point, got {info['dtype']}")
    if info["n"] == 0:
        raise BagError(f"{path}: bag has zero rows")
    try:
        with _open(path) as f:
            ds, shape, squeeze = _features_layout(path, f)
            _read_coords(path, f, shape[0])
            if info["format"] == "wsi_ncmi" and "embed_dim" in f.attrs and int(f.attrs["embed_dim"]) != shape[1]:
                raise BagError(f"{path}: attrs embed_dim={f.attrs['embed_dim']} but features have D={shape[1]}")
            if check_values:
                for start in range(0, shape[0], CHUNK_ROWS):
                    stop = min(start + CHUNK_ROWS, shape[0])
                    block = ds[0, start:stop] if squeeze else ds[start:stop]
                    if not np.isfinite(block).all():
                        bad = start + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
                        raise BagError(f"{path}: features contain NaN or inf (first at row {bad})")
            if TISSUE in f and tuple(f[TISSUE].shape) != (shape[0],):
                raise BagError(f"{path}: tissue_fraction has shape {f[TISSUE].shape}, expected ({shape[0]},)")
    except BagError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        raise BagError(f"{path}: cannot read bag data (truncated or corrupt?): {exc}") from exc
    return info


# ---------------------------------------------------------------------------------------------- folders
def stale_tmp_files(directory: str | os.PathLike) -> list[Path]:
    """Leftover ``*.h5.tmp`` files of interrupted writers in ``directory``."""
    return sorted(Path(directory).glob("*.h5" + TMP_SUFFIX))


def list_bags(directory: str | os.PathLike) -> dict[str, Path]:
    """``{slide_id: path}`` of the ``*.h5`` files in ``directory`` (not recursive; files are not opened).

    Leftover ``*.h5.tmp`` files are ignored and reported in the log.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BagError(f"{directory}: bags folder does not exist")
    stale = stale_tmp_files(directory)
    if stale:
        log.warning(
            "%s: ignoring %d unfinished bag file(s) from interrupted writers: %s",
            directory,
            len(stale),
            ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else ""),
        )
    return {_slide_id_from_path(p): p for p in sorted(directory.glob("*.h5")) if p.is_file()}
