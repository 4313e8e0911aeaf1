"""Published numbers to compare against: the NCMI paper's Table III (NCMI.md §6).

Test macro-F1 / macro-AUC on CAMELYON-17 (4 classes: negative / ITC / micro / macro, test = centers 3–4)
and BRACS (3-class task: benign / atypical / malignant, official split). Two rows per aggregator:

* ``"baseline"`` — the aggregator trained with its own objective and evaluated with its head
  (our ``objective="head"`` run, protocol ``"head"``);
* ``"ncmi_lp"`` — NCMI training, then linear probing (our ``objective="ncmi"`` run, protocol ``"lp"``).

The paper does not report the CC protocol or LP on CE-trained models for MIL, so those have no entry.
Which dataset a split table belongs to is :func:`wsi_ncmi.data.official.detect_dataset`.
"""

from __future__ import annotations

__all__ = [
    "PAPER_TABLE_III",
    "PAPER_NUM_CLASSES",
    "ROW_LABELS",
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
