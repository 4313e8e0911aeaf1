"""Temperature scaling fitted on validation and the calibration metrics (issue #27, part 2)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from wsi_ncmi.evaluation.calibration import (
    apply_temperature,
    calibration_block,
    calibration_markdown,
    calibration_metrics,
    fit_temperature,
    nll,
    reliability_bins,
)


def _probe_like(n: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hard-regularised logistic regression on two noisy classes: probabilities ~0.5, ranking right."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.standard_normal((n, 5)) * noise + 1.5 * y[:, None]
    return x, y, rng.standard_normal(5)


def test_temperature_lowers_validation_nll_of_a_hard_regularised_probe() -> None:
    x, y, _ = _probe_like(60, 0)
    xv, yv, _ = _probe_like(20, 1)
    xt, yt, _ = _probe_like(40, 2)
    probe = LogisticRegression(C=1e-4).fit(x, y)
    pv, pt = probe.predict_proba(xv), probe.predict_proba(xt)
    assert np.abs(pv - 0.5).max() < 0.01  # the symptom: every probability ~0.5
    t = fit_temperature(pv, yv)
    assert t < 0.1
    after_v, after_t = apply_temperature(pv, t), apply_temperature(pt, t)
    assert nll(after_v, yv) < nll(pv, yv) - 0.1  # the fitted temperature lowers the validation NLL
    np.testing.assert_array_equal(after_t.argmax(1), pt.argmax(1))  # predictions unchanged
    assert roc_auc_score(yt, after_t[:, 1]) == pytest.approx(roc_auc_score(yt, pt[:, 1]))  # ranking unchanged
    before, after = calibration_metrics(pt, yt), calibration_metrics(after_t, yt)
    assert after["mean_max_prob_correct"] > 0.75 > before["mean_max_prob_correct"]
    assert after["ece"] < before["ece"] and after["brier"] < before["brier"]


def test_separable_validation_gives_a_finite_temperature_capped_by_platt_targets() -> None:
    pv = np.array([[0.51, 0.49]] * 5 + [[0.49, 0.51]] * 5)  # perfectly separated, 5 slides per class
    yv = np.array([0] * 5 + [1] * 5)
    t = fit_temperature(pv, yv)
    p = apply_temperature(pv, t)
    # Platt's target for 5 slides of a class is 6/7: the fit lands there, not at probability 1
    np.testing.assert_allclose(p.max(axis=1), 6 / 7, atol=1e-4)


def test_temperature_keeps_zero_probabilities_and_rejects_bad_values() -> None:
    p = np.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    q = apply_temperature(p, 0.5)
    assert (q[:, 2] == 0).all() and np.allclose(q.sum(1), 1.0)
    assert q[0, 0] == pytest.approx(0.36 / (0.36 + 0.16))
    assert fit_temperature(p, np.array([0, 1])) > 0
    assert fit_temperature(np.full((4, 2), 0.5), np.array([0, 1, 0, 1])) == 1.0  # nothing to scale
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(p, 0.0)
    with pytest.raises(ValueError, match="probability 0"):
        fit_temperature(p, np.array([2, 1]))


def test_calibration_metrics_on_constructed_probabilities() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.35, 0.65], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    m = calibration_metrics(p, y)
    # bins: 0.9 -> (0.8, 0.9] acc 1; 0.8 -> (0.7, 0.8] acc 0; 0.65 -> (0.6, 0.7] acc 1; 0.6 -> (0.5, 0.6] acc 1
    assert m["ece"] == pytest.approx((0.1 + 0.8 + 0.35 + 0.4) / 4)
    assert m["brier"] == pytest.approx((0.02 + 1.28 + 0.245 + 0.32) / 4)
    assert m["mean_max_prob"] == pytest.approx((0.9 + 0.8 + 0.65 + 0.6) / 4)
    assert m["mean_max_prob_correct"] == pytest.approx((0.9 + 0.65 + 0.6) / 3)
    b = reliability_bins(p, y)
    assert b["count"].sum() == 4 and np.isnan(b["accuracy"][0])


def test_calibration_block_and_markdown() -> None:
    pv = np.array([[0.52, 0.48], [0.47, 0.53], [0.51, 0.49], [0.45, 0.55]])
    yv = np.array([0, 1, 0, 1])
    t = fit_temperature(pv, yv)
    block = calibration_block("lp", t, (pv, yv), (pv, yv), temperatures={"cc": 0.01})
    assert set(block) >= {"classifier", "method", "temperature", "test", "reliability_png"}
    assert set(block["test"]) == {"before", "after"}
    assert set(block["test"]["after"]) >= {"ece", "brier", "mean_max_prob", "mean_max_prob_correct"}
    assert block["test"]["after"]["mean_max_prob"] > block["test"]["before"]["mean_max_prob"]
    text = "\n".join(calibration_markdown(block))
    assert "## Calibration of the `lp` probabilities" in text and "reliability.png" in text and "`cc` 0.01" in text


def test_a_classifier_at_chance_gets_near_uniform_probabilities_with_its_argmax_kept() -> None:
    rng = np.random.default_rng(0)
    pv = rng.dirichlet(np.ones(4), size=40)  # confident scores that say nothing about the labels
    yv = rng.integers(0, 4, size=40)
    t = fit_temperature(pv, yv)
    pt = rng.dirichlet(np.ones(4), size=200)
    after = apply_temperature(pt, t)
    assert np.abs(after - 0.25).max() < 0.05 and after.max(1).mean() < 0.26  # near uniform: "no idea" ...
    np.testing.assert_array_equal(after.argmax(1), pt.argmax(1))  # ... but the predicted class is unchanged
