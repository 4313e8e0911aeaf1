"""Streamed image evaluation equals the in-memory computation it replaced (to 1e-6).

The reference below is the former in-memory ``evaluate_image_model``: extract every output of both splits,
then CC from ``cc_scores``, LP on the whole-split centred/normalised features and ``ncmi_metric`` on the
whole test split.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from wsi_ncmi.natural.evaluate import (
    cc_scores,
    classifier_ncmi,
    evaluate_image_model,
    extract_outputs,
    topk_accuracy,
)
from wsi_ncmi.natural.probe import LinearProbeConfig, fit_linear_probe
from wsi_ncmi.ncmi import NCMIError, NCMILoss, NCMIMetricAccumulator, ncmi_metric


class _Backbone(nn.Module):
    """A fixed random conv + pooling: images [B, 3, 4, 4] -> features [B, 10] (non-negative)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).mean(dim=(2, 3))


def _images(n: int, seed: int, num_classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    proto = torch.randn(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    x = proto[y] + 0.7 * torch.randn(n, 3, 4, 4, generator=g)
    return x, y


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]


def _reference(backbone, train, test, num_classes, *, head=None, ncmi=None, lp=None) -> dict:
    """The former in-memory evaluate_image_model (all three protocols)."""
    te = extract_outputs(backbone, test, head=head, ncmi=ncmi)
    tr = extract_outputs(backbone, train, head=head, ncmi=ncmi)
    res: dict = {"protocols": {}, "n_test": int(te.labels.numel()), "n_train": int(tr.labels.numel())}
    if te.logits is not None:
        res["protocols"]["head"] = topk_accuracy(te.logits, te.labels)
    if te.probs is not None:
        res["protocols"]["cc"] = topk_accuracy(cc_scores(tr.probs, tr.labels, te.probs, num_classes), te.labels)
    if te.normalized is not None:
        x_tr, x_te = tr.normalized, te.normalized
    else:
        mean = tr.features.mean(dim=0, keepdim=True)
        x_tr, x_te = F.normalize(tr.features - mean, dim=1), F.normalize(te.features - mean, dim=1)
    layer = fit_linear_probe(x_tr, tr.labels, num_classes, lp)
    with torch.no_grad():
        res["protocols"]["lp"] = topk_accuracy(layer(x_te), te.labels)
    probs = te.probs if te.probs is not None else te.logits.softmax(dim=1)
    res["ncmi_metric"] = ncmi_metric(probs.double(), te.labels, num_classes=num_classes)
    return res


def _assert_same(a: dict, b: dict) -> None:
    assert a["n_test"] == b["n_test"] and a["n_train"] == b["n_train"]
    assert set(a["protocols"]) == set(b["protocols"])
    for name, acc in b["protocols"].items():
        for k, v in acc.items():
            assert a["protocols"][name][k] == pytest.approx(v, abs=1e-6), (name, k)
    for k, v in b["ncmi_metric"].items():
        assert a["ncmi_metric"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_ncmi_accumulator_equals_ncmi_metric_with_empty_class_and_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(203, 7, generator=g, dtype=torch.float64)
    probs = logits.softmax(dim=1)
    probs[:10, 3] = 0.0  # exact zeros: ln is clamped in both implementations
    probs = probs / probs.sum(dim=1, keepdim=True)
    labels = torch.randint(0, 5, (203,), generator=g)  # classes 5 and 6 never occur
    ref = ncmi_metric(probs, labels, num_classes=7)
    acc = NCMIMetricAccumulator(7, 7)
    for i in range(0, 203, 37):  # uneven batches
        acc.update(probs[i : i + 37], labels[i : i + 37])
    got = acc.compute()
    for k in ("cmi", "gamma", "ncmi"):
        assert got[k] == pytest.approx(ref[k], rel=1e-9), k
    assert acc.class_counts.tolist() == torch.bincount(labels, minlength=7).tolist()


def test_ncmi_accumulator_reduce_is_a_sum_over_processes() -> None:
    """Two "ranks" holding halves of the data, summed by ``reduce``, give the metric of all rows."""
    g = torch.Generator().manual_seed(1)
    probs = (3 * torch.randn(120, 6, generator=g, dtype=torch.float64)).softmax(dim=1)
    labels = torch.randint(0, 4, (120,), generator=g)
    halves = [NCMIMetricAccumulator(4, 6), NCMIMetricAccumulator(4, 6)]
    halves[0].update(probs[:50], labels[:50])
    halves[1].update(probs[50:], labels[50:])
    other = halves[1]
    state = {id(t): u for t, u in zip(
        (halves[0].centroids.sums, halves[0].centroids.counts, halves[0].log_sums, halves[0].neg_entropy),
        (other.centroids.sums, other.centroids.counts, other.log_sums, other.neg_entropy), strict=True)}
    halves[0].reduce(lambda t: t + state[id(t)])  # what an all-gather + sum over two ranks returns
    ref = ncmi_metric(probs, labels, num_classes=4)
    got = halves[0].compute()
    for k in ("cmi", "gamma", "ncmi"):
        assert got[k] == pytest.approx(ref[k], rel=1e-9), k
    with pytest.raises(NCMIError, match="no batch"):
        NCMIMetricAccumulator(4, 6).reduce(lambda t: t)


def test_ncmi_accumulator_nsf_dimension_differs_from_classes() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(90, 12, generator=g).softmax(dim=1)  # D = 12 simplex, C = 4 classes
    labels = torch.arange(90) % 4
    acc = NCMIMetricAccumulator(4, 12)
    for i in range(0, 90, 16):
        acc.update(probs[i : i + 16], labels[i : i + 16])
    ref = ncmi_metric(probs.double(), labels, num_classes=4)
    assert acc.compute() == pytest.approx(ref, rel=1e-9)


def test_ncmi_accumulator_single_class_warns_inf_like_ncmi_metric() -> None:
    acc = NCMIMetricAccumulator(3, 3)
    acc.update(torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.long))
    with pytest.warns(RuntimeWarning, match="Γ = 0"):
        got = acc.compute()
    assert math.isinf(got["ncmi"]) and got["gamma"] == 0.0
    with pytest.raises(ValueError, match="no batch"):
        NCMIMetricAccumulator(3, 3).compute()


def _ncmi_loss(backbone: nn.Module, x: torch.Tensor) -> NCMILoss:
    torch.manual_seed(0)
    loss = NCMILoss(6, 10, tau=0.3, use_centering=True)
    loss.train()
    with torch.no_grad():
        loss.center(backbone(x))  # initialise the EMA center from the training features
    return loss.eval()


def test_streamed_evaluation_equals_in_memory_ncmi_run() -> None:
    torch.manual_seed(0)
    bb = _Backbone()
    xtr, ytr = _images(150, 0)
    xte, yte = _images(70, 1)
    ncmi = _ncmi_loss(bb, xtr)
    head = nn.Linear(10, 6)
    lp = LinearProbeConfig(epochs=8, batch_size=32)
    train, test = _batches(xtr, ytr, 32), _batches(xte, yte, 16)  # plain lists: no size hint, buffer grows
    ref = _reference(bb, train, test, 6, head=head, ncmi=ncmi, lp=lp)
    got = evaluate_image_model(bb, train, test, 6, head=head, ncmi=ncmi, lp=lp)
    assert got["lp_input"] == "ncmi_center_l2"
    _assert_same(got, ref)
    assert ref["protocols"]["cc"]["top1"] > 1 / 6  # the comparison is not between two degenerate runs


def test_streamed_evaluation_equals_in_memory_head_run_with_dataloaders() -> None:
    torch.manual_seed(0)
    bb = _Backbone()
    xtr, ytr = _images(130, 2)
    xte, yte = _images(50, 3)
    head = nn.Linear(10, 6)
    lp = LinearProbeConfig(epochs=8, batch_size=32)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=24)  # len(dataset) preallocates the LP buffer
    test = DataLoader(TensorDataset(xte, yte), batch_size=24)
    ref = _reference(bb, train, test, 6, head=head, lp=lp)
    got = evaluate_image_model(bb, train, test, 6, head=head, lp=lp)
    assert got["lp_input"] == "train_mean_l2" and "cc" not in got["protocols"]
    _assert_same(got, ref)
    assert ref["protocols"]["lp"]["top1"] > 0.5


def test_float16_lp_input_gives_the_same_probe_within_half_precision() -> None:
    torch.manual_seed(0)
    bb = _Backbone()
    xtr, ytr = _images(120, 4)
    train = _batches(xtr, ytr, 32)
    lp = LinearProbeConfig(epochs=6, batch_size=32)
    kw = dict(head=nn.Linear(10, 6), protocols=("lp",), lp=lp)
    full = evaluate_image_model(bb, train, train, 6, **kw)
    half = evaluate_image_model(bb, train, train, 6, lp_dtype=torch.float16, **kw)
    assert abs(full["protocols"]["lp"]["top1"] - half["protocols"]["lp"]["top1"]) <= 2 / 120
    with pytest.raises(ValueError, match="lp_dtype"):
        evaluate_image_model(bb, train, train, 6, lp_dtype=torch.int8, **kw)
    x = F.normalize(torch.randn(64, 10), dim=1)
    y = torch.arange(64) % 6
    w32 = fit_linear_probe(x, y, 6, lp).weight
    w16 = fit_linear_probe(x.half(), y, 6, lp).weight
    assert torch.allclose(w32, w16, atol=5e-3)


class _PairModel(nn.Module):
    """Returns (scores [B, C], probs [B, D]) like an NCMI network scored by its centroids."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.flatten(1)[:, :8]
        return f[:, :3], f.softmax(dim=1)


def test_classifier_ncmi_streams_pairs_and_stops_at_limit() -> None:
    x, y = _images(45, 5, num_classes=3)
    loader = _batches(x, y, 10)
    got = classifier_ncmi(_PairModel(), loader, 3, limit=33)
    assert got["n"] == 33
    f = x.flatten(1)[:33, :8]
    assert got["top1"] == pytest.approx(topk_accuracy(f[:, :3], y[:33], ks=(1,))["top1"], abs=1e-6)
    ref = ncmi_metric(f.softmax(dim=1).double(), y[:33], num_classes=3)
    for k in ("cmi", "gamma", "ncmi"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
    with pytest.raises(ValueError, match="outputs 3 classes"):
        classifier_ncmi(_PairModel(), loader, 4)


def test_logit_classifier_ncmi_equals_in_memory() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    x, y = _images(60, 6, num_classes=4)
    loader = _batches(x, y, 16)
    got = classifier_ncmi(model, loader, 4)
    with torch.no_grad(), warnings.catch_warnings():
        logits = model(x)
    ref = ncmi_metric(logits.double().softmax(dim=1), y, num_classes=4)
    assert got["n"] == 60
    assert got["top1"] == pytest.approx(topk_accuracy(logits, y)["top1"], abs=1e-6)
    for k in ("cmi", "gamma", "ncmi"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
