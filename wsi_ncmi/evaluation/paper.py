"""Published numbers to compare against: the NCMI paper's Table III (NCMI.md §6).

Test macro-F1 / macro-AUC on CAMELYON-17 (4 classes: negative / ITC / micro / macro, test = centers 3–4)
and BRACS (3-class task: benign / atypical / malignant, official split). Two rows per aggregator:

* ``"baseline"`` — the aggregator trained with its own objective and evaluated with its head
  (our ``objective="head"`` run, protocol ``"head"``);
* ``"ncmi_lp"`` — NCMI training, then linear probing (our ``objective="ncmi"`` run, protocol ``"lp"``).

The paper does not report the CC protocol or LP on CE-trained models for MIL, so those have no entry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "PAPER_TABLE_III",
    "PAPER_NUM_CLASSES",
    "ROW_LABELS",
    "detect_dataset",
    "paper_row",
    "paper_for_protocol",
    "paper_rows",
]

# dataset -> aggregator -> row -> {"macro_f1", "macro_auc"}
PAPER_TABLE_III: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "camelyon17": {
        "abmil": {"baseline": {"macro_f1": 0.522, "macro_auc": 0.853}, "ncmi_lp": {"macro_f1": 0.567, "macro_auc": 0.892}},
        "transmil": {"baseline": {"macro_f1": 0.554, "macro_auc": 0.792}, "ncmi_lp": {"macro_f1": 0.582, "macro_auc": 0.853}},
        "aem": {"baseline": {"macro_f1": 0.647, "macro_auc": 0.887}, "ncmi_lp": {"macro_f1": 0.663, "macro_auc": 0.907}},
        "asmil": {"baseline": {"macro_f1": 0.689, "macro_auc": 0.898}, "ncmi_lp": {"macro_f1": 0.710, "macro_auc": 0.914}},
    },
    "bracs": {
        "abmil": {"baseline": {"macro_f1": 0.680, "macro_auc": 0.866}, "ncmi_lp": {"macro_f1": 0.701, "macro_auc": 0.872}},
        "transmil": {"baseline": {"macro_f1": 0.631, "macro_auc": 0.841}, "ncmi_lp": {"macro_f1": 0.662, "macro_auc": 0.878}},
        "aem": {"baseline": {"macro_f1": 0.742, "macro_auc": 0.905}, "ncmi_lp": {"macro_f1": 0.779, "macro_auc": 0.918}},
        "asmil": {"baseline": {"macro_f1": 0.781, "macro_auc": 0.914}, "ncmi_lp": {"macro_f1": 0.824, "macro_auc": 0.936}},
    },
}

# The task each dataset's numbers are for (BRACS: the 3-class task, not the 7-subtype one).
PAPER_NUM_CLASSES = {"camelyon17": 4, "bracs": 3}

# (objective, protocol) -> row of the table that matches it
_ROW_FOR = {("head", "head"): "baseline", ("ncmi", "lp"): "ncmi_lp"}

ROW_LABELS = {"baseline": "baseline (head)", "ncmi_lp": "+NCMI-LP"}


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


def paper_rows(dataset: str, model: str, num_classes: int | None = None) -> dict[str, dict[str, float]] | None:
    """Both Table III rows for (dataset, aggregator), or None when the paper has no such entry
    (unknown dataset / aggregator, or a class count other than the paper's task)."""
    ds = PAPER_TABLE_III.get(dataset.lower())
    if ds is None:
        return None
    if num_classes is not None and num_classes != PAPER_NUM_CLASSES[dataset.lower()]:
        return None
    return ds.get(model.lower())


def paper_row(dataset: str, model: str, row: str, num_classes: int | None = None) -> dict[str, float] | None:
    """One row (``"baseline"`` or ``"ncmi_lp"``) of Table III, or None."""
    rows = paper_rows(dataset, model, num_classes)
    return None if rows is None else rows.get(row)


def paper_for_protocol(
    dataset: str, model: str, objective: str, protocol: str, num_classes: int | None = None
) -> dict[str, float] | None:
    """The Table III test numbers that correspond to our (objective, protocol), or None."""
    row = _ROW_FOR.get((objective, protocol))
    return None if row is None else paper_row(dataset, model, row, num_classes)
