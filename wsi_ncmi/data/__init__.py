"""Data layer: HDF5 bags (`bags`), split tables (`splits`), the official split protocols (`official`) and the MIL
dataset / datamodule (`mil`).

Names are re-exported lazily so that `import wsi_ncmi.data.bags` (used by preprocessing) does not pull in
pandas, torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # bags
    "SCHEMA_VERSION": "bags",
    "Bag": "bags",
    "BagError": "bags",
    "LazyFeatures": "bags",
    "write_bag": "bags",
    "read_bag": "bags",
    "read_features": "bags",
    "check_finite_features": "bags",
    "read_header": "bags",
    "inspect_bag": "bags",
    "validate_bag": "bags",
    "list_bags": "bags",
    "stale_tmp_files": "bags",
    # splits
    "SplitError": "splits",
    "load_split": "splits",
    "make_split": "splits",
    "write_split": "splits",
    "select_fold": "splits",
    # split_check (split table + bags folder)
    "SplitReport": "split_check",
    "validate_split": "split_check",
    "SplitBags": "split_check",
    "resolve_split_bags": "split_check",
    "preflight_check": "split_check",
    "PreflightError": "split_check",
    # official protocols
    "OFFICIAL_PROTOCOLS": "official",
    "detect_dataset": "official",
    "camelyon17_splits": "official",
    "bracs_splits": "official",
    "camelyon17_loco": "official",
    "official_tables": "official",
    "write_official": "official",
    # mil
    "BagDataset": "mil",
    "collate_bags": "batching",
    "EpochWeightedSampler": "batching",
    "MILDataModule": "mil",
    "MILDataError": "mil",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wsi_ncmi.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
