"""Slide-level metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from wsi_ncmi.metrics import MetricsError, binary_auc, classification_metrics

# 4 slides, 3 classes, class 2 never true and never predicted; predictions = argmax = [0, 1, 1, 1]
Y = np.array([0, 0, 1, 1])
P = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.25, 0.65, 0.10],
        [0.30, 0.60, 0.10],
        [0.10, 0.80, 0.10],
    ]
)


def test_hand_computed_with_absent_class() -> None:
    m = classification_metrics(Y, P, num_classes=3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    # class 0: tp 1, support 2, predicted 1 -> 2/3; class 1: tp 2, support 2, predicted 3 -> 4/5
    assert m["per_class_f1"][0] == pytest.approx(2 / 3)
    assert m["per_class_f1"][1] == pytest.approx(4 / 5)
    assert m["per_class_f1"][2] is None  # 0/0: absent from truth and predictions
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    # AUC over the present classes 0 and 1: class 0 pos {.7,.25} vs neg {.3,.1} -> 3/4 pairs;
    # class 1 pos {.6,.8} vs neg {.2,.65} -> 3/4 pairs
    assert m["macro_auc"] == pytest.approx(0.75)


def test_macro_f1_is_not_micro() -> None:
    m = classification_metrics(Y, P, num_classes=3)
    assert m["macro_f1"] != pytest.approx(m["accuracy"])  # micro-F1 equals accuracy here (0.75)
    assert m["macro_f1"] == pytest.approx(f1_score(Y, P.argmax(1), average="macro"))


def test_predicted_but_never_true_class_counts_as_zero() -> None:
    y = np.array([0, 1, 1])
    p = np.array([[0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])  # slide 0 predicted as class 2
    m = classification_metrics(y, p, num_classes=3)
    assert m["per_class_f1"] == [0.0, 1.0, 0.0]
    assert m["macro_f1"] == pytest.approx(1 / 3)


def test_matches_sklearn_when_every_class_present() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    logits = rng.normal(size=(40, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, p, num_classes=4)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))


def test_auc_nan_with_a_single_class() -> None:
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), num_classes=2)
    assert math.isnan(m["macro_auc"])
    assert m["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("y", "p", "c"),
    [
        (np.array([0, 1]), np.ones((2, 3)) / 3, 2),  # proba has 3 columns for 2 classes
        (np.array([0, 3]), np.ones((2, 3)) / 3, 3),  # label out of range
        (np.array([0.0, 1.0]), np.ones((2, 3)) / 3, 3),  # float labels
        (np.array([0, 1]), np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]]), 3),
        (np.array([], dtype=int), np.zeros((0, 3)), 3),
    ],
)
def test_bad_inputs_raise(y: np.ndarray, p: np.ndarray, c: int) -> None:
    with pytest.raises(MetricsError):
        classification_metrics(y, p, num_classes=c)


def test_binary_auc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        pos = rng.random(30) < 0.4
        scores = rng.integers(0, 5, size=30).astype(float)  # many ties
        assert binary_auc(pos, scores) == pytest.approx(roc_auc_score(pos, scores))
    assert math.isnan(binary_auc(np.zeros(3, bool), np.arange(3.0)))


def test_topk_hits_counts_per_k_and_caps_k_at_the_classes() -> None:
    import torch

    from wsi_ncmi.metrics import topk_hits

    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    hits = topk_hits(scores, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert {k: int(v) for k, v in hits.items()} == {1: 1, 2: 2, 5: 3}  # top-5 of 3 classes hits every row
