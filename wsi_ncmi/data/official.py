"""The official split protocols shipped in ``splits/``: each one's name, expected counts and table paths, how
to recognise it from a split-table path, how to build its tables from the reference slide lists, and the
README of ``splits/``.

Protocols (:data:`OFFICIAL_PROTOCOLS`, name -> :class:`OfficialProtocol`):

* ``camelyon17``: the AEM / ASMIL protocol, test = centers 3-4 (200 slides), val = 10 % of the patients of
  centers 0-2 (grouped, stratified), seeds 0-2: ``camelyon17/seed{0,1,2}.csv``;
* ``camelyon17_loco``: leave one center out (test = that center, 100 slides): ``camelyon17/loco_center{0..4}.csv``;
* ``bracs``: the official BRACS split (train 395 / val 65 / test 87), 3- and 7-class tasks:
  ``bracs/official_{3,7}class.csv``.

:func:`detect_dataset` names the protocol of a split-table path (the evaluation uses it to pick the dataset of
a run and the paper's numbers to compare with). Table schema, loading and generation: :mod:`wsi_ncmi.data.splits`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.split_check import validate_split
from wsi_ncmi.data.splits import (
    SplitError,
    check_table,
    make_split,
    summary_markdown,
    write_split,
)

__all__ = [
    "CAMELYON17_LABELS",
    "CAMELYON17_EXPECTED",
    "CAMELYON17_TEST_CENTERS",
    "BRACS_SUBTYPES",
    "BRACS_3CLASS",
    "BRACS_3CLASS_NAMES",
    "BRACS_GROUPS",
    "BRACS_EXPECTED",
    "OFFICIAL_SEEDS",
    "OfficialProtocol",
    "OFFICIAL_PROTOCOLS",
    "PROTOCOL_EXPECTED",
    "detect_dataset",
    "official_expected",
    "camelyon17_labels",
    "camelyon17_splits",
    "camelyon17_loco",
    "bracs_splits",
    "official_tables",
    "official_readme",
    "readme_sections",
    "write_official",
]

log = logging.getLogger(__name__)

CAMELYON17_LABELS = ("negative", "itc", "micro", "macro")
CAMELYON17_EXPECTED = {"all": {0: 318, 1: 36, 2: 59, 3: 87}, "test": 200}
CAMELYON17_TEST_CENTERS = (3, 4)
BRACS_SUBTYPES = ("N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC")  # reference labels 0..6
BRACS_3CLASS = {"N": 0, "PB": 0, "UDH": 0, "FEA": 1, "ADH": 1, "DCIS": 2, "IC": 2}
BRACS_3CLASS_NAMES = ("benign", "atypical", "malignant")
BRACS_GROUPS = {"BT": 0, "AT": 1, "MT": 2}
BRACS_EXPECTED = {"train": 395, "val": 65, "test": 87}
OFFICIAL_SEEDS = (0, 1, 2)  # seeds of the shipped camelyon17/seed<k>.csv tables


@dataclass(frozen=True)
class OfficialProtocol:
    """One official protocol: its name, the counts ``validate_split`` checks, its tables under ``splits/``."""

    name: str
    expected: Mapping[str, Any]  # {split | "all": n or {label: n}}
    paths: tuple[str, ...]


OFFICIAL_PROTOCOLS: dict[str, OfficialProtocol] = {
    "camelyon17": OfficialProtocol(
        "camelyon17", CAMELYON17_EXPECTED, tuple(f"camelyon17/seed{s}.csv" for s in OFFICIAL_SEEDS)
    ),
    "camelyon17_loco": OfficialProtocol(
        "camelyon17_loco",
        {"all": CAMELYON17_EXPECTED["all"], "test": 100},
        tuple(f"camelyon17/loco_center{c}.csv" for c in range(5)),
    ),
    "bracs": OfficialProtocol(
        "bracs", BRACS_EXPECTED, ("bracs/official_3class.csv", "bracs/official_7class.csv")
    ),
}
PROTOCOL_EXPECTED: dict[str, Mapping[str, Any]] = {name: p.expected for name, p in OFFICIAL_PROTOCOLS.items()}


# -------------------------------------------------------------------------------------------- detection
_DATASET_ALIASES = {
    "camelyon17": ("camelyon17", "camelyon-17", "camelyon_17", "c17"),
    "bracs": ("bracs",),
}


def detect_dataset(path: str | os.PathLike) -> str:
    """Dataset name from a split-table path: ``"camelyon17"`` or ``"bracs"`` when a path component
    (folder or file stem, case-insensitive) names it, else ``"unknown"``.

    CAMELYON-17 leave-one-center-out tables (file stem starting with ``loco``, as ``splits/camelyon17/
    loco_center<k>.csv``) are ``"camelyon17_loco"``: another protocol than the paper's Table III (test =
    centers 3-4), so no paper numbers are shown beside them and they are not averaged with it.
    For a shipped table the name is its protocol's (a key of :data:`OFFICIAL_PROTOCOLS`).
    """
    name = _detect(path)
    if name == "camelyon17" and Path(path).stem.lower().startswith("loco"):
        return "camelyon17_loco"
    return name


def _detect(path: str | os.PathLike) -> str:
    parts = [p.lower() for p in Path(path).parts]
    parts[-1:] = [Path(parts[-1]).stem] if parts else []
    for name, aliases in _DATASET_ALIASES.items():
        for part in parts:
            tokens = set(re.split(r"[^a-z0-9-]+", part)) | {part}
            if any(a in tokens or part.startswith(a + "_") or part.startswith(a + "-") for a in aliases):
                return name
    return "unknown"


def official_expected(name: str) -> Mapping[str, Any]:
    """Expected counts of a shipped table, by its name under ``splits/`` (e.g. ``camelyon17/seed0.csv``)."""
    return PROTOCOL_EXPECTED[detect_dataset(name)]


# ------------------------------------------------------------------------------------------------ build


def _read_reference(path: str | os.PathLike, columns: Iterable[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: reference table not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SplitError(f"{path}: missing column(s) {missing} (has {list(df.columns)})")
    return df


def camelyon17_labels(reference_csv: str | os.PathLike) -> pd.DataFrame:
    """CAMELYON-17 labels with ``patient_id`` (``patient_XXX`` from ``patient_XXX_node_Y``) and ``center``."""
    ref = _read_reference(reference_csv, ("slide_id", "label", "center"))
    pid = ref["slide_id"].str.extract(r"^(patient_\d+)_node_\d+$")[0]
    if pid.isna().any():
        raise SplitError(
            f"{reference_csv}: slide {ref.loc[pid.isna(), 'slide_id'].iloc[0]!r} is not "
            "named patient_XXX_node_Y"
        )
    label = ref["label"].astype(int)
    return pd.DataFrame(
        {
            "slide_id": ref["slide_id"],
            "patient_id": pid,
            "label": label,
            "center": ref["center"].astype(int),
            "label_name": label.map(dict(enumerate(CAMELYON17_LABELS))),
        }
    )


def camelyon17_splits(reference_csv: str | os.PathLike, seed: int = 0, val: float = 0.1) -> pd.DataFrame:
    """AEM/ASMIL protocol: test = centers 3-4; ``val`` of the centers 0-2 patients (grouped, stratified)."""
    return make_split(
        camelyon17_labels(reference_csv),
        "center",
        val=val,
        test=0.0,
        seed=seed,
        test_centers=CAMELYON17_TEST_CENTERS,
    )


def camelyon17_loco(
    reference_csv: str | os.PathLike, center: int, seed: int = 0, val: float = 0.1
) -> pd.DataFrame:
    """Leave-one-center-out: test = ``center``; train/val from the other four (grouped by patient)."""
    return make_split(
        camelyon17_labels(reference_csv), "center", val=val, test=0.0, seed=seed, test_centers=[center]
    )


def bracs_splits(reference_csv: str | os.PathLike, classes: int = 3) -> pd.DataFrame:
    """The official BRACS split (train/val/test as in the reference table) with 3 or 7 classes.

    The reference table carries no patient identifiers, so ``patient_id`` is the slide id: the patient
    grouping of the official split (made by the dataset's authors) is kept but cannot be checked here.
    """
    if classes not in (3, 7):
        raise SplitError(f"BRACS has a 3-class and a 7-class task, not {classes}")
    ref = _read_reference(reference_csv, ("slide_id", "split", "group", "subtype", "label"))
    for i, row in enumerate(ref.itertuples(index=False)):
        if row.subtype not in BRACS_3CLASS or BRACS_SUBTYPES.index(row.subtype) != int(row.label):
            raise SplitError(
                f"{reference_csv} row {i + 2}: subtype {row.subtype!r} does not match label {row.label}"
            )
        if BRACS_GROUPS.get(row.group) != BRACS_3CLASS[row.subtype]:
            raise SplitError(
                f"{reference_csv} row {i + 2}: group {row.group!r} disagrees with {row.subtype!r}"
            )
    if classes == 3:
        label = ref["subtype"].map(BRACS_3CLASS).astype(int)
        names = label.map(dict(enumerate(BRACS_3CLASS_NAMES)))
    else:
        label, names = ref["label"].astype(int), ref["subtype"]
    out = pd.DataFrame(
        {
            "slide_id": ref["slide_id"],
            "patient_id": ref["slide_id"],
            "label": label,
            "split": ref["split"],
            "label_name": names,
        }
    )
    return check_table(out, str(reference_csv))


def official_tables(
    camelyon17_csv: str | os.PathLike, bracs_csv: str | os.PathLike, seeds: Iterable[int] = OFFICIAL_SEEDS
) -> dict[str, pd.DataFrame]:
    """Every shipped table, keyed by its path under ``splits/`` (e.g. ``camelyon17/seed0.csv``)."""
    out: dict[str, pd.DataFrame] = {}
    for s in seeds:
        out[f"camelyon17/seed{s}.csv"] = camelyon17_splits(camelyon17_csv, seed=s)
    for c in range(5):
        out[f"camelyon17/loco_center{c}.csv"] = camelyon17_loco(camelyon17_csv, center=c, seed=0)
    out["bracs/official_3class.csv"] = bracs_splits(bracs_csv, classes=3)
    out["bracs/official_7class.csv"] = bracs_splits(bracs_csv, classes=7)
    return out


# ------------------------------------------------------------------------------------------------ README
_README_HEAD = """# Split tables

Generated by `python splits/build_official.py` (or `wsi-ncmi splits official`) from `{c17}` and
`{bracs}`; do not edit by hand. A test checks that every table below matches its CSV and, where
`../shared/reference` exists, that the CSVs are what the generator produces.

Columns: `slide_id, patient_id, label, split` (+ `center`, `label_name`). Load with
`wsi_ncmi.data.splits.load_split`, check with `wsi-ncmi splits validate FILE --protocol NAME [--bags DIR]`.

## CAMELYON-17 (`camelyon17/`)
- Source: 500 labelled slides, labels 0 negative / 1 ITC / 2 micro / 3 macro, centers 0-4 (100 slides each).
- `patient_id` is `patient_XXX` taken from the slide name `patient_XXX_node_Y` (5 slides per patient;
  every patient belongs to one center).
- `seed{{0,1,2}}.csv` (the AEM / ASMIL protocol, grouped): test = centers 3 and 4 (200 slides); train / val
  from centers 0-2 with 10% of the *patients* in val, stratified by each patient's highest label, seeded.
  Unlike the published protocol (val drawn per slide), no patient has slides on both sides.
- `loco_center{{0..4}}.csv` (leave one center out, seed 0): test = that center; val = 10% of the other
  centers' patients (grouped, stratified the same way).

## BRACS (`bracs/`)
- Source: the official split of the BRACS dataset, train 395 / val 65 / test 87 slides, as given in the
  reference table (not re-drawn).
- `official_7class.csv`: labels 0-6 = N, PB, UDH, FEA, ADH, DCIS, IC.
- `official_3class.csv`: benign (N, PB, UDH) = 0, atypical (FEA, ADH) = 1, malignant (DCIS, IC) = 2; the
  generator checks this agrees with the reference's `group` column (BT / AT / MT).
- `patient_id`: the reference table has **no patient identifiers**, so `patient_id` is the slide id. The
  official split was made per patient by the dataset's authors; that grouping is kept but cannot be
  verified from our data, and the patient counts below are slide counts.

## Counts per file
"""


def official_readme(tables: Mapping[str, pd.DataFrame], camelyon17_csv: str, bracs_csv: str) -> str:
    """The README of ``splits/``: protocol notes and one count table per shipped file."""
    parts = [_README_HEAD.format(c17=camelyon17_csv, bracs=bracs_csv)]
    for name, table in tables.items():
        parts.append(f"### `{name}`\n\n{summary_markdown(table)}\n")
    return "\n".join(parts)


def readme_sections(text: str) -> dict[str, str]:
    """``{file name: its count table}`` parsed back from a README written by ``official_readme``."""
    out = {}
    for m in re.finditer(r"^### `([^`]+)`\n\n((?:\|.*\|\n?)+)", text, flags=re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def write_official(
    out_dir: str | os.PathLike,
    camelyon17_csv: str | os.PathLike,
    bracs_csv: str | os.PathLike,
    source_names: tuple[str, str] | None = None,
) -> list[Path]:
    """Write every official table and the README under ``out_dir`` (atomic writes); return the paths."""
    out_dir = Path(out_dir)
    tables = official_tables(camelyon17_csv, bracs_csv)
    for name, table in tables.items():
        validate_split(table, expected_counts=official_expected(name), strict=True)
    written = [write_split(t, out_dir / name) for name, t in tables.items()]
    c17_name, bracs_name = source_names or (str(camelyon17_csv), str(bracs_csv))
    readme = atomic_write_text(out_dir / "README.md", official_readme(tables, c17_name, bracs_name))
    return [*written, readme]
