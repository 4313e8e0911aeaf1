"""Probabilities that mean something: temperature scaling fitted on validation, and how calibrated they are.

Why it is needed: the linear probe's ``C`` sweep keeps the smallest ``C`` among ties (the strongest
regularisation), so its decision values, and the NCMI classes' −KL(p ‖ ξ) scores, are tiny (~1e-3): the
softmax is ~1/C for every slide although the *ranking* is right. One positive temperature T per classifier
rescales the class scores, ``softmax(log p / T)`` (:func:`apply_temperature`; log p = the classifier's
log-probabilities, which equal its logits up to a per-row constant): the argmax and, for two classes, the
ranking (AUC) are unchanged.

:func:`fit_temperature` fits T on the **validation** split by minimising the cross-entropy against Platt's
smoothed targets (a slide of class c counts as (n_c + 1) / (n_c + 2) of class c, the rest spread over the other
classes; n_c = validation slides of class c). With the few, often perfectly separated validation slides of a
cohort, the plain NLL would push T → 0 (probability 1 on everything); the smoothed target caps the confidence
at what n_c slides can support. T is kept at 1 when it would not lower the plain validation NLL, and bounded so
that the largest score gap stays ≥ 1e-3 (a classifier at chance on validation gets near-uniform probabilities
whose order, hence the predicted class, survives in float64).

Calibration metrics (:func:`calibration_metrics`): ECE (top-label, 10 equal-width confidence bins), the
multi-class Brier score (mean over slides of Σ_c (p_c − y_c)²), the mean max-probability and the mean
max-probability of the correct predictions. :func:`calibration_block` is ``report["calibration"]``,
:func:`calibration_markdown` its ``report.md`` section and :func:`plot_reliability` the reliability diagram.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ncmi.data.markdown import markdown_table

__all__ = ["CALIBRATION_METHOD", "N_BINS", "RELIABILITY_PNG", "apply_temperature", "calibration_block",
           "calibration_markdown", "calibration_metrics", "fit_temperature", "nll", "plot_reliability", "protocol_probabilities",
           "reliability_bins"]

logger = logging.getLogger(__name__)

CALIBRATION_METHOD = "temperature"
N_BINS = 10
RELIABILITY_PNG = "reliability.png"


def _log_p(proba: np.ndarray) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p)  # [N, C]; a class the classifier never predicts stays −inf


def apply_temperature(proba: Any, temperature: float) -> np.ndarray:
    """softmax(log p / T) row-wise -> [N, C] float64 (T = 1 returns the probabilities renormalised)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    z = _log_p(proba) / float(temperature)  # [N, C]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(proba: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-300)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return float(-np.log(np.clip(p[np.arange(y.size), y], 1e-300, None)).mean())


def _smoothed_targets(labels: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Platt's targets [N, C]: (n_c + 1) / (n_c + 2) on the true class, the rest over the other finite classes."""
    n, c = finite.shape
    counts = np.bincount(labels, minlength=c)
    t = np.zeros((n, c), dtype=np.float64)
    for i, y in enumerate(labels):
        others = finite[i].copy()
        others[y] = False
        on = (counts[y] + 1.0) / (counts[y] + 2.0) if others.any() else 1.0
        t[i, y] = on
        if others.any():
            t[i, others] = (1.0 - on) / others.sum()
    return t


def fit_temperature(proba: Any, labels: Any) -> float:
    """T > 0 fitted on validation probabilities ``proba`` [N, C] and labels [N] (module docstring)."""
    from scipy.optimize import minimize_scalar

    logp = _log_p(proba)
    y = np.asarray(labels, dtype=np.int64)
    if logp.ndim != 2 or y.shape != (logp.shape[0],) or y.size == 0:
        raise ValueError(f"fit_temperature: need proba [N, C] and labels [N], got {logp.shape} and {y.shape}")
    finite = np.isfinite(logp)
    if not finite[np.arange(y.size), y].all():
        raise ValueError("fit_temperature: a validation slide's true class has probability 0")
    z = np.where(finite, logp - np.where(finite, logp, -np.inf).max(axis=1, keepdims=True), -np.inf)
    gaps = -z[finite & (z < 0)]  # distances of the other classes' log-probabilities from each row's maximum
    if gaps.size == 0:
        return 1.0  # every class score equal: no temperature changes anything
    # β = 1/T from "the largest gap becomes 1e-3" (almost uniform, the order still exact in float64) to "the
    # smallest gap becomes 1e3" (saturated): a classifier no better than chance on val gets the former, not T → ∞
    bounds = (math.log(1e-3 / gaps.max()), max(math.log(1e3 / gaps.min()), math.log(1e-3 / gaps.max()) + 1.0))
    target = _smoothed_targets(y, finite)

    def loss(log_beta: float) -> float:
        s = np.where(finite, z * math.exp(log_beta), -np.inf)  # [N, C]
        m = s.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
        return float(-((target * np.where(finite, s, 0.0)).sum(axis=1) - lse).mean())

    res = minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-6})
    t = float(math.exp(-res.x))
    if nll(apply_temperature(proba, t), y) > nll(apply_temperature(proba, 1.0), y):
        logger.info("temperature %.4g would raise the validation NLL; kept T = 1", t)
        return 1.0
    return t


def reliability_bins(proba: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN in empty bins)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (k/n, (k+1)/n] -> k
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=(pred == y).astype(np.float64), minlength=n_bins) / count
    return {"count": count, "confidence": confidence, "accuracy": accuracy,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def calibration_metrics(proba: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, float | None]:
    """ECE, Brier, NLL, mean max-probability (all slides, and the correctly predicted ones)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    b = reliability_bins(p, y, n_bins)
    used = b["count"] > 0
    ece = float((b["count"][used] / y.size * np.abs(b["accuracy"][used] - b["confidence"][used])).sum())
    onehot = np.eye(p.shape[1])[y]
    correct = p.argmax(axis=1) == y
    return {"ece": ece, "brier": float(((p - onehot) ** 2).sum(axis=1).mean()), "nll": nll(p, y),
            "mean_max_prob": float(p.max(axis=1).mean()),
            "mean_max_prob_correct": float(p.max(axis=1)[correct].mean()) if correct.any() else None,
            "accuracy": float(correct.mean())}


def calibration_block(classifier: str, temperature: float, val: tuple[np.ndarray, np.ndarray],
                      test: tuple[np.ndarray, np.ndarray], reliability_png: str | None = RELIABILITY_PNG,
                      temperatures: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``report["calibration"]``: ``val`` / ``test`` = (uncalibrated proba [N, C], labels [N]) of ``classifier``."""
    out: dict[str, Any] = {"classifier": classifier, "method": CALIBRATION_METHOD, "temperature": float(temperature),
                           "fitted_on": "val", "n_bins": N_BINS, "reliability_png": reliability_png}
    for name, (p, y) in (("val", val), ("test", test)):
        out[name] = {"before": calibration_metrics(p, y), "after": calibration_metrics(apply_temperature(p, temperature), y)}
    if temperatures:
        out["temperatures"] = {k: float(v) for k, v in temperatures.items()}
    return out


def plot_reliability(path: str | os.PathLike, proba: np.ndarray, labels: np.ndarray, temperature: float,
                     title: str = "") -> Path:
    """Reliability diagram (accuracy vs confidence per bin) before and after the temperature -> PNG."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfectly calibrated")
    for name, p, style in (("before", proba, "o-"), (f"after (T = {temperature:.3g})",
                                                     apply_temperature(proba, temperature), "s-")):
        b = reliability_bins(p, labels)
        used = b["count"] > 0
        ece = calibration_metrics(p, labels)["ece"]
        ax.plot(b["confidence"][used], b["accuracy"][used], style, ms=4, label=f"{name}, ECE {ece:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (max probability)", ylabel="accuracy",
           title=title or "reliability")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def calibration_markdown(block: Mapping[str, Any]) -> list[str]:
    """Lines of the ``report.md`` section for ``report["calibration"]``."""
    keys = ("ece", "brier", "nll", "mean_max_prob", "mean_max_prob_correct")
    lines = ["", f"## Calibration of the `{block['classifier']}` probabilities", "",
             f"{block['method'].capitalize()} scaling fitted on the validation split (T = "
             f"{block['temperature']:.4g}; predicted class and ranking unchanged). ECE: top-label, "
             f"{block.get('n_bins', N_BINS)} equal-width bins (lower is better); Brier: mean Σ_c (p_c − y_c)²; "
             "mean max-p: the average probability of the predicted class (correct predictions: how sure the right "
             "answers are).", ""]
    rows = [[split, when, *(_fmt(block[split][when].get(k)) for k in keys)]
            for split in ("test", "val") if split in block for when in ("before", "after")]
    lines += markdown_table(["split", "", "ECE ↓", "Brier ↓", "NLL ↓", "mean max-p", "mean max-p (correct)"], rows)
    if block.get("temperatures"):
        lines += ["", "Temperatures of the other classifiers (`wsi-ncmi predict --classifier`): "
                  + ", ".join(f"`{k}` {v:.4g}" for k, v in block["temperatures"].items())]
    if block.get("reliability_png"):
        lines += ["", f"![reliability diagram, test]({block['reliability_png']})"]
    return lines


def protocol_probabilities(preds: Any, protocol: str, split: str,
                           class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(proba [N, C], labels [N]) of one protocol and split from ``evaluate_run``'s predictions table."""
    rows = preds[(preds["protocol"] == protocol) & (preds["split"] == split)]
    return (rows[[f"prob_{n}" for n in class_names]].to_numpy(dtype=np.float64),
            rows["label"].to_numpy(dtype=np.int64))
