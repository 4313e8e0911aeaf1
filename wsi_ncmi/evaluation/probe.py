"""Classifiers fitted on frozen slide embeddings: the linear probe (LP) and the nearest centroid (CC).

**LP** (NCMI.md §3): scikit-learn ``LogisticRegression`` (lbfgs; multinomial for C > 2 classes, the
only multi-class mode of lbfgs) on the centred, L2-normalised slide embedding. The inverse
regularisation strength ``C`` is swept over a log grid: one model per value is fitted on the training
split and scored on the validation split by ``macro-F1 + macro-AUC`` (the AEM/ASMIL model-selection
rule; a NaN AUC counts as 0). Ties go to the **smaller** ``C`` (stronger regularisation).

Refit choice: by default (``refit="train"``) the probe that is kept is the one fitted on the training
split alone with the selected ``C``; validation data only selects ``C`` and never enters the weights,
so the validation metrics of the probe stay comparable to those of the head and CC protocols.
``refit="train+val"`` refits on both splits with the selected ``C`` (more data, but validation numbers
are then in-sample).

Seeds: lbfgs is deterministic, so ``seed`` (passed as ``random_state``) changes nothing for it; it
matters for the stochastic solvers (``"saga"``, ``"sag"``) that can be selected with ``solver``.

Classes missing from the fitting data get probability 0 in :meth:`LinearProbe.predict_proba`, which
always returns [N, num_classes] columns in class-index order.

**CC**: :func:`fit_centroid_classifier` wraps :class:`wsi_ncmi.ncmi.NearestCentroidClassifier`
(closed-form class means of the training simplex points, paper Eq. 6; scores softmax(−KL)).
"""

from __future__ import annotations

import logging
import math
import typing
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from wsi_ncmi.choices import check_choices
from wsi_ncmi.errors import UserError
from wsi_ncmi.metrics import MetricsError, classification_metrics
from wsi_ncmi.ncmi import NearestCentroidClassifier

__all__ = ["ProbeError", "LinearProbe", "DEFAULT_CS", "REFITS", "SOLVERS", "Refit", "Solver", "fit_centroid_classifier"]

logger = logging.getLogger(__name__)

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 3, 13))
Refit = Literal["train", "train+val"]
Solver = Literal["lbfgs", "newton-cg", "newton-cholesky", "sag", "saga"]  # the multinomial-capable solvers
REFITS: tuple[str, ...] = typing.get_args(Refit)
SOLVERS: tuple[str, ...] = typing.get_args(Solver)


class ProbeError(UserError):
    """Bad input to a probe (shapes, labels, unknown option, not fitted)."""


def _as_xy(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y)
    if xa.ndim != 2:
        raise ProbeError(f"{name}: embeddings must be 2-D [N, E], got shape {xa.shape}")
    if ya.ndim != 1 or ya.shape[0] != xa.shape[0]:
        raise ProbeError(f"{name}: labels must be 1-D with {xa.shape[0]} entries, got shape {ya.shape}")
    if xa.shape[0] == 0:
        raise ProbeError(f"{name}: no samples")
    if not np.all(np.isfinite(xa)):
        raise ProbeError(f"{name}: embeddings contain NaN or inf")
    return xa, ya.astype(np.int64)


class LinearProbe:
    """Multinomial logistic regression with ``C`` selected on a validation split (module docstring).

    ``fit(x_train [N, E], y_train [N], x_val, y_val)`` → self; ``predict_proba(x) -> [N, num_classes]``;
    ``predict(x) -> [N]``. After fitting: ``C_`` (selected), ``val_scores_`` ({C: score}), ``model_``.
    """

    def __init__(
        self,
        num_classes: int,
        Cs: Sequence[float] = DEFAULT_CS,
        class_weight: Literal["balanced"] | None = None,
        seed: int = 0,
        refit: Refit = "train",
        solver: Solver = "lbfgs",
        max_iter: int = 5000,
    ) -> None:
        check_choices(LinearProbe, locals(), "LinearProbe", ProbeError)
        if num_classes < 2:
            raise ProbeError(f"LinearProbe: num_classes must be >= 2, got {num_classes}")
        if not Cs or any(not (c > 0) for c in Cs):
            raise ProbeError(f"LinearProbe: Cs must be a non-empty list of positive numbers, got {list(Cs)}")
        self.num_classes = int(num_classes)
        self.Cs = tuple(sorted(float(c) for c in Cs))
        self.class_weight = class_weight
        self.seed = int(seed)
        self.refit = refit
        self.solver = solver
        self.max_iter = int(max_iter)
        self.model_: LogisticRegression | None = None
        self.C_: float | None = None
        self.val_scores_: dict[float, float] = {}

    def _new(self, c: float) -> LogisticRegression:
        return LogisticRegression(
            C=c,
            solver=self.solver,
            class_weight=self.class_weight,
            random_state=self.seed,
            max_iter=self.max_iter,
        )

    def _fit_one(self, c: float, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._new(c).fit(x, y)

    def _proba(self, model: LogisticRegression, x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], self.num_classes), dtype=np.float64)  # [N, C]
        out[:, model.classes_.astype(np.int64)] = model.predict_proba(x)
        return out

    def _score(self, model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
        m = classification_metrics(y, self._proba(model, x), self.num_classes)
        auc = m["macro_auc"]
        return m["macro_f1"] + (0.0 if math.isnan(auc) else auc)

    def fit(self, x_train: Any, y_train: Any, x_val: Any, y_val: Any) -> LinearProbe:
        xt, yt = _as_xy(x_train, y_train, "LinearProbe train split")
        xv, yv = _as_xy(x_val, y_val, "LinearProbe val split")
        if xt.shape[1] != xv.shape[1]:
            raise ProbeError(f"LinearProbe: train has dim {xt.shape[1]}, val has dim {xv.shape[1]}")
        for name, ys in (("train", yt), ("val", yv)):
            if ys.min() < 0 or ys.max() >= self.num_classes:
                raise ProbeError(f"LinearProbe: {name} labels must be in [0, {self.num_classes - 1}]")
        if np.unique(yt).size < 2:
            raise ProbeError("LinearProbe: the train split holds a single class; nothing to fit")
        best_c, best_score, best_model = None, -math.inf, None
        self.val_scores_ = {}
        for c in self.Cs:  # ascending, so a strict '>' keeps the smallest C among ties
            model = self._fit_one(c, xt, yt)
            try:
                score = self._score(model, xv, yv)
            except MetricsError as err:  # pragma: no cover - inputs were checked above
                raise ProbeError(f"LinearProbe: scoring C={c} on val failed: {err}") from err
            self.val_scores_[c] = score
            if score > best_score + 1e-12:
                best_c, best_score, best_model = c, score, model
        assert best_c is not None and best_model is not None
        self.C_ = best_c
        if self.refit == "train+val":
            best_model = self._fit_one(best_c, np.concatenate([xt, xv]), np.concatenate([yt, yv]))
        self.model_ = best_model
        logger.info("linear probe: selected C=%g (val macro-F1 + macro-AUC = %.4f)", best_c, best_score)
        return self

    def _check_fitted(self, x: Any) -> np.ndarray:
        if self.model_ is None:
            raise ProbeError("LinearProbe: call fit() before predicting")
        xa = np.asarray(x, dtype=np.float64)
        if xa.ndim != 2 or xa.shape[1] != self.model_.n_features_in_:
            raise ProbeError(f"LinearProbe: expected [N, {self.model_.n_features_in_}], got shape {xa.shape}")
        return xa

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities [N, num_classes] (0 for classes unseen in fitting)."""
        xa = self._check_fitted(x)
        assert self.model_ is not None
        return self._proba(self.model_, xa)

    def predict(self, x: Any) -> np.ndarray:
        """argmax of :meth:`predict_proba` -> [N] int64."""
        return self.predict_proba(x).argmax(axis=1)


def fit_centroid_classifier(
    train_log_probs: Any, train_labels: Any, num_classes: int
) -> NearestCentroidClassifier:
    """CC protocol: class means of the training simplex points exp(log p) [N, D] (Eq. 6).

    Classes without training samples are allowed; they are never predicted (probability 0).
    """
    lp = np.asarray(train_log_probs, dtype=np.float64)
    y = np.asarray(train_labels).astype(np.int64)
    if lp.ndim != 2 or y.shape != (lp.shape[0],):
        raise ProbeError(f"fit_centroid_classifier: expected log_probs [N, D] and labels [N], got {lp.shape}, {y.shape}")
    return NearestCentroidClassifier(num_classes=num_classes, allow_empty=True).fit(np.exp(lp), y)
