"""Closed-form centroids, the CC classifier, the dataset NCMI metric and the matrix-information metrics."""

import math

import numpy as np
import pytest
import torch

from wsi_ncmi.ncmi import (
    CentroidAccumulator,
    NCMIError,
    NearestCentroidClassifier,
    class_centroids,
    class_representations,
    hdr,
    matrix_entropy,
    matrix_mutual_information_ratio,
    ncmi_metric,
    nsf,
)


def _probs(n, d, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return nsf(torch.randn(n, d, generator=g, dtype=torch.float64) * scale)


def _kl(a, b):
    return float(sum(a[k] * (math.log(a[k]) - math.log(b[k])) for k in range(len(a))))


# --------------------------------------------------------------------------- centroids
def test_class_centroids_is_class_mean_and_empty_class_policy():
    p = _probs(9, 4)
    y = torch.tensor([0, 2, 2, 0, 0, 2, 2, 0, 2])
    s = class_centroids(p, y, 3, allow_empty=True)
    torch.testing.assert_close(s[0], p[y == 0].mean(0))
    torch.testing.assert_close(s[2], p[y == 2].mean(0))
    assert torch.isnan(s[1]).all()
    with pytest.raises(ValueError, match=r"classes \[1\] have no samples"):
        class_centroids(p, y, 3)
    with pytest.raises(NCMIError, match="labels must be in"):
        class_centroids(p, y, 2)


def test_streaming_accumulator_equals_one_shot():
    p = _probs(50, 6, seed=1).float()
    y = torch.arange(50) % 4
    acc = CentroidAccumulator(4, 6)
    with pytest.raises(NCMIError, match="no batch"):
        acc.compute()
    for start in range(0, 50, 7):
        acc.update(p[start : start + 7], y[start : start + 7])
    torch.testing.assert_close(acc.compute(), class_centroids(p, y, 4), rtol=1e-6, atol=1e-7)
    assert acc.compute().dtype == torch.float32
    with pytest.raises(NCMIError, match="dim 5"):
        acc.update(torch.rand(2, 5), torch.tensor([0, 1]))
    acc.reset()
    acc.update(p[:3].numpy(), y[:3].numpy())  # numpy batches work too
    with pytest.raises(NCMIError, match="no samples"):
        acc.compute()


def test_nearest_centroid_classifier_torch_and_numpy():
    torch.manual_seed(0)
    logits = torch.randn(60, 5, dtype=torch.float64) * 0.3
    y = torch.arange(60) % 3
    logits[torch.arange(60), y] += 4.0  # class v has a peak on coordinate v
    p = nsf(logits)
    clf = NearestCentroidClassifier().fit(p, y)
    assert clf.centroids_.shape == (3, 5)
    pred = clf.predict(p)
    assert isinstance(pred, torch.Tensor) and torch.equal(pred, y)
    kl = clf.kl_to_centroids(p[:4])
    for i in range(4):
        for v in range(3):
            assert kl[i, v].item() == pytest.approx(_kl(p[i].tolist(), clf.centroids_[v].tolist()), abs=1e-10)
    proba = clf.predict_proba(p[:4])
    torch.testing.assert_close(proba, torch.softmax(-kl, 1))
    torch.testing.assert_close(proba.sum(1), torch.ones(4, dtype=torch.float64))
    pred_np = NearestCentroidClassifier().fit(p.numpy(), y.numpy()).predict(p.numpy())
    assert isinstance(pred_np, np.ndarray) and (pred_np == y.numpy()).all()
    proba_np = clf.predict_proba(p[:4].numpy())
    assert isinstance(proba_np, np.ndarray)
    np.testing.assert_allclose(proba_np, proba.numpy())
    with pytest.raises(NCMIError, match="call fit"):
        NearestCentroidClassifier().predict(p)
    with pytest.raises(NCMIError, match=r"\[N, 5\]"):
        clf.predict(p[:, :4])


def test_nearest_centroid_empty_class_is_never_predicted():
    p = _probs(10, 4)
    y = torch.tensor([0, 2] * 5)
    clf = NearestCentroidClassifier(num_classes=3, allow_empty=True).fit(p, y)
    assert (clf.predict(p) != 1).all()
    assert torch.all(clf.predict_proba(p)[:, 1] == 0)
    assert torch.isinf(clf.kl_to_centroids(p)[:, 1]).all()


# --------------------------------------------------------------------------- ncmi_metric
def _ncmi_reference(p, y):
    """Pairwise form of Eq. 5–8: Γ averages KL(s^{y_j} || p_i) over all ordered pairs with y_j != y_i."""
    n = len(y)
    classes = sorted(set(y))
    s = {
        v: [sum(p[i][d] for i in range(n) if y[i] == v) / y.count(v) for d in range(len(p[0]))]
        for v in classes
    }
    cmi = sum(_kl(p[i], s[y[i]]) for i in range(n)) / n
    gamma = sum(_kl(s[y[j]], p[i]) for i in range(n) for j in range(n) if y[j] != y[i]) / n**2
    return cmi, gamma


def test_ncmi_metric_matches_pairwise_reference():
    p = _probs(14, 5, seed=2)
    y = [0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 3, 3, 0, 2]
    out = ncmi_metric(p, torch.tensor(y))
    cmi, gamma = _ncmi_reference(p.tolist(), y)
    assert out["cmi"] == pytest.approx(cmi, rel=1e-10)
    assert out["gamma"] == pytest.approx(gamma, rel=1e-10)
    assert out["ncmi"] == pytest.approx(cmi / gamma, rel=1e-10)
    # with a class count C larger than the labels present, absent classes contribute nothing
    out6 = ncmi_metric(p.numpy(), y, num_classes=6)  # numpy probs, list labels
    assert out6["ncmi"] == pytest.approx(out["ncmi"], rel=1e-12)
    # precomputed (e.g. streamed) centroids give the same numbers
    cents = class_centroids(p, torch.tensor(y), 4)
    assert ncmi_metric(p, torch.tensor(y), centroids=cents)["ncmi"] == pytest.approx(out["ncmi"], rel=1e-12)


def test_ncmi_metric_separated_classes_have_zero_cmi():
    y = torch.arange(30) % 3
    logits = torch.full((30, 4), -8.0, dtype=torch.float64)
    logits[torch.arange(30), y] = 8.0  # every sample of a class has the same one-hot-like point
    out = ncmi_metric(nsf(logits), y)
    assert out["cmi"] == pytest.approx(0.0, abs=1e-12)
    assert out["gamma"] > 1.0
    assert out["ncmi"] == pytest.approx(0.0, abs=1e-12)
    noisy = ncmi_metric(nsf(logits + torch.randn(30, 4, dtype=torch.float64) * 3), y)
    assert noisy["ncmi"] > out["ncmi"] + 1e-3


def test_ncmi_metric_identical_probabilities_warn_and_give_inf():
    p = torch.full((6, 4), 0.25)
    with pytest.warns(RuntimeWarning, match="Γ = 0"):
        out = ncmi_metric(p, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out["gamma"] == 0.0 and out["cmi"] == pytest.approx(0.0, abs=1e-12)
    assert math.isinf(out["ncmi"])


def test_ncmi_metric_bad_input():
    with pytest.raises(ValueError, match="one label per row"):
        ncmi_metric(_probs(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        ncmi_metric(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


# --------------------------------------------------------------------------- matrix information
def _np_entropy(z):
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(u @ u.T / len(u)), 0, None)
    lam = lam[lam > 0]
    return float(-(lam * np.log(lam)).sum()), u @ u.T


def test_matrix_entropy_extremes_and_both_paths():
    assert matrix_entropy(torch.eye(6)) == pytest.approx(math.log(6), abs=1e-10)
    assert matrix_entropy(torch.ones(5, 3) * 2.0) == pytest.approx(0.0, abs=1e-10)
    rng = np.random.default_rng(0)
    tall = rng.normal(size=(40, 6))  # d < N: the d×d path
    wide = rng.normal(size=(5, 12))  # d >= N: the N×N path
    for z in (tall, wide):
        assert matrix_entropy(z) == pytest.approx(_np_entropy(z)[0], abs=1e-9)
        assert matrix_entropy(z * 7.0) == pytest.approx(matrix_entropy(z), abs=1e-9)  # rows are normalised
    assert matrix_entropy(tall) <= math.log(6) + 1e-9


def test_mir_and_hdr_match_formulas():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(20, 4)), rng.normal(size=(20, 7))
    h1, k1 = _np_entropy(z1)
    h2, k2 = _np_entropy(z2)
    prod = k1 * k2
    lam = np.clip(np.linalg.eigvalsh(prod / 20), 0, None)
    lam = lam[lam > 0]
    h12 = float(-(lam * np.log(lam)).sum())
    assert matrix_mutual_information_ratio(z1, z2) == pytest.approx((h1 + h2 - h12) / min(h1, h2), abs=1e-9)
    assert hdr(z1, z2) == pytest.approx(abs(h1 - h2) / max(h1, h2), abs=1e-9)
    with pytest.raises(ValueError, match="same number of rows"):
        hdr(z1, z2[:5])


def test_neural_collapse_limits():
    y = torch.arange(12) % 4
    onehot = class_representations(torch.zeros(12, 3), y, 4, kind="onehot")
    assert onehot.shape == (12, 4)
    # collapsed features: every sample equals a class-specific orthogonal vector
    collapsed = torch.eye(4, dtype=torch.float64)[y] * 3.0
    assert matrix_mutual_information_ratio(collapsed, onehot) == pytest.approx(1.0, abs=1e-9)
    assert hdr(collapsed, onehot) == pytest.approx(0.0, abs=1e-9)
    cent = class_representations(collapsed, y, 4)
    torch.testing.assert_close(cent, torch.eye(4, dtype=torch.float64)[y])
    noisy = collapsed + torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert matrix_mutual_information_ratio(noisy, onehot) < 1.0 - 1e-3
    assert hdr(noisy, onehot) > 1e-3
    with pytest.raises(ValueError, match="kind"):
        class_representations(collapsed, y, 4, kind="nope")


def test_centroid_accumulator_sum_fn_and_unchecked_labels() -> None:
    acc = CentroidAccumulator(3, 2)
    acc.update(torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 0]))
    with pytest.raises(NCMIError, match="labels must be in"):
        acc.update(torch.tensor([[0.5, 0.5]]), torch.tensor([3]))
    acc.update(torch.tensor([[1.0, 0.0]]), torch.tensor([2]), check_labels=False)
    doubled = acc.compute(allow_empty=True, sum_fn=lambda t: 2 * t)  # e.g. two ranks with the same rows
    assert torch.allclose(doubled[[0, 2]], torch.tensor([[0.4, 0.6], [1.0, 0.0]]))
    assert torch.isnan(doubled[1]).all()  # class 1 empty
    assert acc.counts.tolist() == [2, 0, 1]  # sum_fn leaves the running sums as they were
