"""Epoch-level classification metrics logged during training (NCMI.md §3 "MIL metrics").

Kept here (not in ``wsi_ncmi.evaluation``) because training may not import evaluation; the final
reports are the evaluation module's job. Macro-F1 is the macro average (never micro-F1 = accuracy).

Macro one-vs-rest AUC averages the per-class AUCs over the classes that have both positive and negative
samples in the split; a class absent from the split is skipped (logged once) instead of raising, and the
AUC is NaN when fewer than two classes are present.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

__all__ = ["classification_metrics", "macro_ovr_auc"]

logger = logging.getLogger(__name__)


def macro_ovr_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of AUC(label == c, scores[:, c]); classes without both outcomes are skipped.

    scores [N, C] class scores (probabilities or any monotone score), labels [N] ints.
    """
    aucs = []
    skipped = []
    for c in range(scores.shape[1]):
        pos = labels == c
        if pos.all() or not pos.any():
            skipped.append(c)
            continue
        aucs.append(roc_auc_score(pos.astype(int), scores[:, c]))
    if skipped:
        logger.debug("macro AUC: classes %s have no positive or no negative sample; skipped", skipped)
    return float(np.mean(aucs)) if aucs else math.nan


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"accuracy", "macro_f1", "macro_auc", "f1_plus_auc"}`` from scores [N, C] and labels [N].

    ``f1_plus_auc`` (the default checkpoint monitor, as AEM selects models) treats a NaN AUC as 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"classification_metrics: scores {scores.shape} do not match labels {labels.shape}")
    pred = scores.argmax(axis=1)
    acc = float((pred == labels).mean()) if labels.size else math.nan
    f1 = float(f1_score(labels, pred, average="macro", zero_division=0)) if labels.size else math.nan
    auc = macro_ovr_auc(scores, labels) if labels.size else math.nan
    both = (0.0 if math.isnan(f1) else f1) + (0.0 if math.isnan(auc) else auc)
    return {"accuracy": acc, "macro_f1": f1, "macro_auc": auc, "f1_plus_auc": both}
