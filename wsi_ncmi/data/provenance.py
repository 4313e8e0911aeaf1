"""What a model was trained on: the provenance of its training bags, and checking new bags against it.

At fit time :func:`datamodule_provenance` reads the header of every bag of the split table (no feature data)
and summarises what decides whether features are comparable (:data:`PROVENANCE_KEYS`):

* ``encoder`` / ``encoder_preset`` (the feature extractor and its published recipe),
* ``weights_sha256`` (the exact weight file),
* ``embed_dim`` (feature dimension D),
* ``target_mpp`` (µm per tile pixel) and ``patch_size`` (tile side in pixels at that resolution).

For each key the distinct values seen in the training bags are kept (normally one; ``None`` when the bags do
not record it, e.g. CLAM files). ``settings`` is the full ``wsi-preprocess`` fingerprint (``settings_json``)
when every bag shares it, so new slides can be preprocessed with exactly the same settings. ``MILModule``
stores the summary in its checkpoints under :data:`CHECKPOINT_KEY`.

:func:`bag_mismatches` compares one new bag with a summary: a key is compared when the training bags recorded
a value for it (``embed_dim`` always); a new bag that lacks a recorded key is a mismatch (it cannot be
verified). Pure Python + h5py (no torch).
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

from .bags import BagError, inspect_bag

__all__ = [
    "CHECKPOINT_KEY",
    "PROVENANCE_KEYS",
    "ProvenanceError",
    "bag_mismatches",
    "bag_provenance",
    "datamodule_provenance",
    "describe",
    "training_provenance",
]

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "training_bags"
PROVENANCE_KEYS = ("encoder", "encoder_preset", "weights_sha256", "embed_dim", "target_mpp", "patch_size")
_FLOAT_KEYS = frozenset({"target_mpp"})
_INT_KEYS = frozenset({"embed_dim", "patch_size"})


class ProvenanceError(UserError):
    """New bags do not match what a checkpoint was trained on, or a checkpoint records no provenance."""


def _clean(key: str, value: Any) -> Any:
    """A JSON-able, comparable form of one provenance value (None = not recorded)."""
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if key in _INT_KEYS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if key in _FLOAT_KEYS:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) and v > 0 else None
    return str(value)


def bag_provenance(path: str | Path) -> dict[str, Any]:
    """The :data:`PROVENANCE_KEYS` of one bag (from its header; ``None`` where it records nothing)."""
    info = inspect_bag(path)
    attrs, cattrs = info["attrs"], info["coords_attrs"]
    raw = {
        "encoder": info.get("encoder"),
        "encoder_preset": attrs.get("encoder_preset"),
        "weights_sha256": attrs.get("weights_sha256"),
        "embed_dim": info["dim"],
        "target_mpp": attrs.get("target_mpp"),
        "patch_size": cattrs.get("patch_size", attrs.get("patch_size_px", attrs.get("patch_size"))),
    }
    return {k: _clean(k, raw[k]) for k in PROVENANCE_KEYS}


def _settings(path: Path) -> dict[str, Any] | None:
    raw = inspect_bag(path)["attrs"].get("settings_json")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        logger.warning("%s: settings_json is not valid JSON; preprocessing settings not recorded", path)
        return None
    return value if isinstance(value, dict) else None


def training_provenance(bag_paths: Iterable[str | Path], **extra: Any) -> dict[str, Any]:
    """Summary of the bags a model is trained on (module docstring); ``extra`` keys are stored as they are.

    Returns ``{"values": {key: [distinct values]}, "n_bags", "settings": dict | None, **extra}``.
    """
    paths = [Path(p) for p in bag_paths]
    if not paths:
        raise ProvenanceError("training_provenance: no bag given")
    values: dict[str, list[Any]] = {k: [] for k in PROVENANCE_KEYS}
    settings: list[dict[str, Any] | None] = []
    for p in paths:
        prov = bag_provenance(p)
        for k, v in prov.items():
            if v not in values[k]:
                values[k].append(v)
        s = _settings(p)
        if s not in settings:
            settings.append(s)
    mixed = {k: v for k, v in values.items() if len(v) > 1}
    if mixed:
        logger.warning("training bags are not homogeneous: %s", mixed)
    if len(settings) > 1:
        logger.warning("training bags were made with %d different preprocessing settings; "
                       "`predict --slides-dir` cannot reproduce them", len(settings))
    return {"values": values, "n_bags": len(paths), "settings": settings[0] if len(settings) == 1 else None,
            **extra}


_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def datamodule_provenance(dm: Any) -> dict[str, Any] | None:
    """:func:`training_provenance` of every bag in a ``MILDataModule``'s split table (cached per datamodule),
    plus ``class_names``, ``bags_dir`` and ``split_csv``; None when ``dm`` has no bags table or a bag cannot
    be read (logged: checkpoints are still written)."""
    if dm is None:
        return None
    try:
        cached = _CACHE.get(dm)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    table, bags_dir = getattr(dm, "table", None), getattr(dm, "bags_dir", None)
    if table is None or bags_dir is None or "slide_id" not in getattr(table, "columns", ()):
        logger.warning("%s has no bags table (table / bags_dir): the checkpoint records no training-bag provenance",
                       type(dm).__name__)
        return None
    resolved = getattr(dm, "bag_paths", None)  # MILDataModule: the bag files it resolved (same <slide_id>.h5)
    paths = [Path(resolved[sid]) if resolved and sid in resolved else Path(bags_dir) / f"{sid}.h5"
             for sid in table["slide_id"].astype(str)]
    try:
        prov = training_provenance(
            paths, class_names=[str(c) for c in (getattr(dm, "class_names", None) or [])],
            bags_dir=str(bags_dir), split_csv=str(getattr(dm, "split_csv", "")),
        )
    except (BagError, ProvenanceError, OSError) as exc:
        logger.warning("could not record the training bags' provenance: %s", exc)
        return None
    try:
        _CACHE[dm] = prov
    except TypeError:
        pass
    return prov


def _same(key: str, a: Any, b: Any) -> bool:
    if key in _FLOAT_KEYS and a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def describe(values: Iterable[Any]) -> str:
    vals = [("(not recorded)" if v is None else str(v)) for v in values]
    return vals[0] if len(vals) == 1 else "one of " + ", ".join(vals)


def bag_mismatches(bag: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """Why a bag's provenance (``bag_provenance``) differs from a training summary; [] when it matches.

    Each entry names the key, the bag's value and the training value(s)."""
    values = recorded.get("values") or {}
    out = []
    for key in PROVENANCE_KEYS:
        trained = [v for v in values.get(key, []) if v is not None]
        if not trained:
            continue  # the training bags did not record it: nothing to compare with
        got = bag.get(key)
        if not any(_same(key, got, t) for t in trained):
            shown = "(not recorded)" if got is None else got
            out.append(f"{key}: bag has {shown}, the checkpoint was trained on {describe(trained)}")
    return out
