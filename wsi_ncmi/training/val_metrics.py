"""Epoch-level validation metrics logged during training (NCMI.md §3 "MIL metrics").

The metrics themselves are :mod:`wsi_ncmi.metrics`, the same code the evaluation reports use; this adds
``f1_plus_auc``, the default checkpoint monitor (AEM selects models by val macro-F1 + macro-AUC).
"""

from __future__ import annotations

import math

import numpy as np

from wsi_ncmi.metrics import classification_metrics

__all__ = ["epoch_metrics"]


def epoch_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"accuracy", "macro_f1", "macro_auc", "f1_plus_auc"}`` from class scores [N, C] and labels [N].

    Conventions are :func:`wsi_ncmi.metrics.classification_metrics`' (macro-AUC over the classes present,
    NaN with fewer than two); ``f1_plus_auc`` treats a NaN AUC as 0. An empty split gives NaN everywhere.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"epoch_metrics: scores {scores.shape} do not match labels {labels.shape}")
    if labels.size == 0:
        return {"accuracy": math.nan, "macro_f1": math.nan, "macro_auc": math.nan, "f1_plus_auc": 0.0}
    m = classification_metrics(labels, scores, scores.shape[1])
    both = m["macro_f1"] + (0.0 if math.isnan(m["macro_auc"]) else m["macro_auc"])
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_auc": m["macro_auc"], "f1_plus_auc": both}
