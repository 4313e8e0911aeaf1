"""Linear probe (C sweep on val) and the nearest-centroid classifier on the NCMI simplex."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ncmi.evaluation.embed import center_and_normalize
from wsi_ncmi.evaluation.probe import DEFAULT_CS, LinearProbe, ProbeError, fit_centroid_classifier
from wsi_ncmi.metrics import classification_metrics
from wsi_ncmi.ncmi import nsf


def _clusters(counts: list[int], dim: int = 8, spread: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = 2.0 * np.eye(dim)[: len(counts)]
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x = means[y] + spread * rng.standard_normal((y.size, dim))
    return x, y


def test_lp_beats_chance_on_separable_embeddings() -> None:
    xt, yt = _clusters([20, 20, 20], seed=0)
    xv, yv = _clusters([8, 8, 8], seed=1)
    xs, ys = _clusters([10, 10, 10], seed=2)
    center = xt.mean(0)
    probe = LinearProbe(3).fit(
        center_and_normalize(xt, center), yt, center_and_normalize(xv, center), yv
    )
    proba = probe.predict_proba(center_and_normalize(xs, center))
    assert proba.shape == (30, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    m = classification_metrics(ys, proba, 3)
    assert m["macro_f1"] > 0.85 and m["macro_auc"] > 0.95  # chance: 1/3 and 1/2
    assert probe.C_ in probe.Cs and set(probe.val_scores_) == set(probe.Cs)
    np.testing.assert_array_equal(probe.predict(center_and_normalize(xs, center)), proba.argmax(1))


def test_lp_selects_the_best_val_score_and_not_the_collapsed_smallest_c() -> None:
    # imbalanced classes: a heavily regularised probe predicts the majority class only (macro-F1 ~ 0.3)
    xt, yt = _clusters([40, 8, 6], spread=0.9, seed=3)
    xv, yv = _clusters([20, 5, 5], spread=0.9, seed=4)
    probe = LinearProbe(3, Cs=(1e-4, 1e-2, 1.0, 100.0)).fit(xt, yt, xv, yv)
    best = max(probe.val_scores_.values())
    assert probe.val_scores_[probe.C_] == pytest.approx(best)
    assert probe.C_ > 1e-4
    assert probe.val_scores_[1e-4] < best - 0.2
    # ties go to the smaller C
    smaller = [c for c, v in probe.val_scores_.items() if v >= best - 1e-12]
    assert probe.C_ == min(smaller)


def test_lp_options_and_missing_train_class() -> None:
    xt, yt = _clusters([10, 10], seed=5)
    xv, yv = _clusters([4, 4], seed=6)
    probe = LinearProbe(3, Cs=(1.0,), class_weight="balanced", refit="train+val").fit(xt, yt, xv, yv)
    assert probe.model_.class_weight == "balanced"
    assert probe.model_.classes_.tolist() == [0, 1]
    proba = probe.predict_proba(xv)
    assert proba.shape == (8, 3) and np.all(proba[:, 2] == 0.0)  # class 2 never seen in fitting
    assert DEFAULT_CS[0] < 1.0 < DEFAULT_CS[-1]


@pytest.mark.parametrize(
    "kwargs", [dict(class_weight="auto"), dict(refit="all"), dict(Cs=()), dict(Cs=(0.0,)), dict(num_classes=1), dict(solver="liblinear")]
)
def test_lp_rejects_bad_options(kwargs: dict) -> None:
    kw = {"num_classes": 3, **kwargs}
    with pytest.raises(ProbeError):
        LinearProbe(**kw)


def test_lp_rejects_bad_data() -> None:
    x, y = _clusters([5, 5], seed=7)
    with pytest.raises(ProbeError, match="before predicting"):
        LinearProbe(2).predict_proba(x)
    with pytest.raises(ProbeError, match="single class"):
        LinearProbe(2).fit(x[:5], y[:5], x, y)
    with pytest.raises(ProbeError, match="dim"):
        LinearProbe(2).fit(x, y, x[:, :3], y)
    with pytest.raises(ProbeError, match="labels"):
        LinearProbe(2).fit(x, y + 1, x, y)


def test_centroid_classifier_on_ncmi_like_probabilities() -> None:
    torch.manual_seed(0)
    c, d = 3, 6
    y = torch.arange(c).repeat_interleave(15)  # [45]
    z = torch.randn(45, d) * 0.5 + 3.0 * torch.eye(c, d)[y]  # class v lifts coordinate v
    log_p = torch.log(nsf(z)).numpy()
    clf = fit_centroid_classifier(log_p, y.numpy(), c)
    probs = np.exp(log_p)
    # reference: explicit class means and KL loops
    means = np.stack([probs[y.numpy() == v].mean(0) for v in range(c)])
    kl = np.array([[np.sum(p * (np.log(p) - np.log(s))) for s in means] for p in probs])
    np.testing.assert_array_equal(clf.predict(probs), kl.argmin(1))
    proba = clf.predict_proba(probs)
    np.testing.assert_allclose(proba, np.exp(-kl) / np.exp(-kl).sum(1, keepdims=True), rtol=1e-6)
    assert (clf.predict(probs) == y.numpy()).mean() > 0.9


def test_centroid_classifier_allows_an_empty_class() -> None:
    log_p = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2]]))
    clf = fit_centroid_classifier(log_p, np.array([0, 1]), 3)
    proba = clf.predict_proba(np.exp(log_p))
    assert proba.shape == (2, 3) and np.all(proba[:, 2] == 0.0)
    with pytest.raises(ProbeError):
        fit_centroid_classifier(log_p, np.array([0]), 3)
