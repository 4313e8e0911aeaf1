"""Classification metrics: macro-F1, macro one-vs-rest AUC, accuracy, balanced accuracy.

One implementation for the per-epoch validation metrics of training (and its checkpoint selection) and the
final reports of evaluation, so the two can never disagree; it imports nothing else of ours.

NCMI.md §3 "MIL metrics". "F1" always means the **macro** average over classes, never micro-F1
(which equals accuracy for single-label multi-class problems).

Conventions for classes that do not occur (documented because small test splits hit them):

* ``per_class_f1[c]`` is ``None`` when class ``c`` is absent from both ``y_true`` and the predictions
  (F1 is 0/0); a class that is predicted but never true (or true but never predicted) gets F1 = 0.
  ``macro_f1`` is the mean over the defined entries, i.e. over the classes present in ``y_true`` or in
  the predictions (scikit-learn's default label set for ``f1_score(average="macro")``).
* ``macro_auc`` is the mean of the binary one-vs-rest AUCs (``roc_auc_score(y == c, proba[:, c])``,
  computed by the equivalent rank-sum formula, :func:`binary_auc`) over
  the classes **present in** ``y_true``; a class absent from ``y_true`` has no positives, so its AUC is
  undefined and it is left out. With fewer than 2 classes present the AUC is NaN. When every class is
  present this equals ``roc_auc_score(y, proba, multi_class="ovr", average="macro")``.
* ``balanced_accuracy`` is the mean recall over the classes present in ``y_true``.
* Predictions are ``argmax`` of ``proba`` (ties go to the lowest class index).

Top-k hits (:func:`topk_hits`, natural-image track) are counted on the device from torch scores, in one
place for the per-step validation logging and the final evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix

from wsi_ncmi.errors import UserError

__all__ = ["MetricsError", "classification_metrics", "macro_ovr_auc", "binary_auc", "topk_hits",
           "SCALAR_METRICS"]

# The scalar entries of a metrics dict, in display order.
SCALAR_METRICS = ("macro_f1", "macro_auc", "accuracy", "balanced_accuracy")


class MetricsError(UserError):
    """Bad input to a metric (shape mismatch, label out of range, non-finite probabilities)."""


def _check(y_true: np.ndarray, proba: np.ndarray, num_classes: int) -> None:
    if y_true.ndim != 1:
        raise MetricsError(f"y_true must be 1-D [N], got shape {y_true.shape}")
    if proba.ndim != 2 or proba.shape != (y_true.shape[0], num_classes):
        raise MetricsError(f"proba must be [N={y_true.shape[0]}, C={num_classes}], got shape {proba.shape}")
    if y_true.shape[0] == 0:
        raise MetricsError("classification_metrics: no samples")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise MetricsError(f"y_true must hold integer labels, got dtype {y_true.dtype}")
    lo, hi = int(y_true.min()), int(y_true.max())
    if lo < 0 or hi >= num_classes:
        raise MetricsError(f"labels must be in [0, {num_classes - 1}], got range [{lo}, {hi}]")
    if not np.all(np.isfinite(proba)):
        raise MetricsError("proba contains NaN or inf")


def _per_class_f1(cm: np.ndarray) -> list[float | None]:
    tp = np.diag(cm).astype(np.float64)
    true_count = cm.sum(axis=1)  # [C] support
    pred_count = cm.sum(axis=0)  # [C]
    out: list[float | None] = []
    for c in range(cm.shape[0]):
        denom = true_count[c] + pred_count[c]
        out.append(None if denom == 0 else float(2.0 * tp[c] / denom))
    return out


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` [N] for the bool mask ``positive`` [N] by the rank-sum (Mann–Whitney U)
    identity, ties counted as 1/2; equal to ``sklearn.metrics.roc_auc_score`` without its per-call
    validation cost (the probe's C sweep calls this many times). NaN when one side is empty."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_ovr_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean binary AUC of ``proba[:, c]`` for ``y_true == c`` over the classes present (NaN if < 2)."""
    present = np.unique(y_true)
    if present.size < 2:
        return math.nan
    return float(np.mean([binary_auc(y_true == c, proba[:, c]) for c in present]))


def classification_metrics(y_true: Any, proba: Any, num_classes: int) -> dict[str, Any]:
    """Metrics of class scores ``proba`` [N, C] against integer labels ``y_true`` [N] (module docstring).

    Returns ``{"macro_f1", "macro_auc", "accuracy", "balanced_accuracy", "per_class_f1" (list of C,
    None for undefined), "confusion" ([C][C] ints, rows = true class, columns = predicted)}``.
    """
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    _check(y, p, num_classes)
    y = y.astype(np.int64)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(num_classes)))  # [C, C]
    f1 = _per_class_f1(cm)
    defined = [v for v in f1 if v is not None]
    support = cm.sum(axis=1)
    recalls = [cm[c, c] / support[c] for c in range(num_classes) if support[c] > 0]
    return {
        "macro_f1": float(np.mean(defined)),
        "macro_auc": macro_ovr_auc(y, p),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recalls)),
        "per_class_f1": f1,
        "confusion": cm.astype(int).tolist(),
    }


def topk_hits(
    scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, torch.Tensor]:
    """Number of rows of ``scores`` [N, C] whose ``target`` [N] is among the top-k scores, per k (0-d tensors on
    the scores' device; k is capped at C)."""
    kmax = min(max(ks), scores.shape[1])
    hit = scores.topk(kmax, dim=1).indices == target[:, None]  # [N, kmax]
    return {k: hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks}
