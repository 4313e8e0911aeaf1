"""Evaluation of natural-image models: head, CC and LP top-1/top-5, dataset-level NCMI.

Protocols (NCMI.md §3):
* ``head`` — the trained linear classifier (CE-family runs, the SupCon online probe).
* ``cc`` — NCMI runs: closed-form class centroids s^v = mean of p over the **un-augmented training set**
  (paper Eq. 6), predict argmin_v KL(p ‖ s^v); class scores −KL for top-5.
* ``lp`` — frozen backbone, NSF dropped: a torch ``nn.Linear`` trained with CE (SGD + momentum, cosine,
  fixed recipe below) on the centred, L2-normalised feature. For NCMI runs the center is the loss's
  EMA feature center (``NCMILoss.normalized``); for other runs it is the training-set feature mean.

:func:`evaluate_image_model` streams: one pass over the training loader (only when ``cc`` or ``lp``
needs it), then one pass over the test loader; every per-batch output is reduced on the fly.

* CC centroids: a :class:`~wsi_ncmi.ncmi.CentroidAccumulator` ([C, D] float64 sums).
* Test CMI / Γ / NCMI: :class:`NCMIMetricAccumulator`, exact streamed sums of the formula of
  :func:`wsi_ncmi.ncmi.ncmi_metric` (per class: Σ p, Σ ln p, and Σ_i Σ_d p ln p).
* head / CC / LP top-k: hit counts per batch.
* LP is the only protocol that keeps per-sample data: the training LP input, **one** [N_train, D] tensor
  (``lp_dtype`` float32, or float16 to halve it) plus the [N_train] labels. For non-NCMI runs the raw
  features are stored and centred + normalised in place (chunk by chunk) after the pass, with the mean
  taken from a float64 running sum.

Peak host memory (``device="cpu"``, bytes), beyond the model and one batch:

    N_train · (D · b + 8)  +  8 · (3 C D + C + D)      b = 4 (lp_dtype float32) or 2 (float16/bfloat16)

with D the feature dimension (the metric accumulators use the probability dimension: D for NSF, C for a
softmax head). Without ``lp`` there is no per-sample term at all, O(C·D). On a GPU device the [C, D]
accumulators live on the GPU, and :func:`~wsi_ncmi.natural.probe.fit_linear_probe` also copies the LP tensor there
(N_train · D · b of GPU memory) while it trains. ImageNet ResNet-50 (N_train 1.28 M, D 2048): 10.5 GB with
float32 LP input, 5.2 GB with float16 (the former in-memory version: ≈ 31 GB plus a float64 copy of the
training probabilities). Measured (CPU, D 512, C 100, N_train 80 000, peak RSS growth): in-memory
1263 MiB, float32 151 MiB, float16 76 MiB (formula: 157 / 79 MiB).

These functions take the pieces of a model (backbone, optional head, optional NCMI loss module) so this
layer does not depend on the training code. :func:`classifier_ncmi` measures a full classifier (top-1 of
its own scores and the NCMI of its probabilities), used by ``wsi-ncmi ncmi-metric`` for the paper's
Figure 2 (the rest of that study is :mod:`wsi_ncmi.natural.metric`). :func:`extract_outputs` keeps the whole split in memory (small sets, debugging, tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.metrics import topk_hits
from wsi_ncmi.ncmi import CentroidAccumulator, NCMIMetricAccumulator, NearestCentroidClassifier
from wsi_ncmi.ncmi.centroids import kl_rows_to_centroids

from .probe import LinearProbeConfig, RowStore, center_normalize_, fit_linear_probe

__all__ = [
    "ImageOutputs",
    "NCMIMetricAccumulator",
    "extract_outputs",
    "topk_accuracy",
    "cc_scores",
    "evaluate_image_model",
    "classifier_ncmi",
    "write_json",
]

logger = logging.getLogger(__name__)

_PROTOCOLS = ("head", "cc", "lp")
_KS = (1, 5)


# ---------------------------------------------------------------------------------------------------
# forward passes
# ---------------------------------------------------------------------------------------------------


def _take(out: Any, k: int) -> Any:
    """First ``k`` rows of a model output (a tensor or a tuple of tensors)."""
    return tuple(t[:k] for t in out) if isinstance(out, tuple) else out[:k]


def _eval_mode(*modules: nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.eval()


def _forward(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device,
    channels_last: bool,
    limit: int | None = None,
) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(model(x), labels [B] long on device)`` per batch, stopping after exactly ``limit`` rows."""
    seen = 0
    for x, y in loader:
        if x.ndim == 5:  # two-view batches: evaluate the first view
            x = x[:, 0]
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(y).to(device).long()
        out = model(x)
        if limit is not None and seen + len(y) >= limit:
            keep = limit - seen
            yield _take(out, keep), y[:keep]
            return
        seen += len(y)
        yield out, y


def _len_hint(loader: Iterable, limit: int | None) -> int:
    """Number of samples ``loader`` will yield when it says so (a DataLoader's dataset), else 0."""
    try:
        n = len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        n = 0
    return min(n, limit) if limit is not None else n


@dataclass
class ImageOutputs:
    """Per-sample outputs of one split (CPU tensors)."""

    features: Tensor  # [N, D] pooled backbone feature
    labels: Tensor  # [N]
    logits: Tensor | None = None  # [N, C] head output
    probs: Tensor | None = None  # [N, D] NSF probabilities (NCMI runs)
    normalized: Tensor | None = None  # [N, D] centred + L2-normalised feature (NCMI runs)


@torch.no_grad()
def extract_outputs(
    backbone: nn.Module,
    loader: Iterable,
    *,
    head: nn.Module | None = None,
    ncmi: nn.Module | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    limit: int | None = None,
) -> ImageOutputs:
    """Run ``backbone`` (eval mode) over ``loader`` of ``(images [B, 3, H, W], labels [B])``; keep everything.

    In-memory (O(N·D) for each output): for small sets. :func:`evaluate_image_model` streams instead.
    """
    _eval_mode(backbone, head, ncmi)
    feats, labels, logits, probs, normed = [], [], [], [], []
    for out, y in _forward(backbone, loader, device=device, channels_last=channels_last, limit=limit):
        f = out.float()  # [B, D]
        feats.append(f.cpu())
        labels.append(y.cpu())
        if head is not None:
            logits.append(head(f).float().cpu())
        if ncmi is not None:
            probs.append(ncmi.log_probs(f).exp().cpu())
            normed.append(ncmi.normalized(f).float().cpu())
    if not feats:
        raise ValueError("extract_outputs: the loader yielded no batch")
    return ImageOutputs(
        features=torch.cat(feats),
        labels=torch.cat(labels).long(),
        logits=torch.cat(logits) if logits else None,
        probs=torch.cat(probs) if probs else None,
        normalized=torch.cat(normed) if normed else None,
    )


# ---------------------------------------------------------------------------------------------------
# streamed reductions
# ---------------------------------------------------------------------------------------------------


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = _KS) -> dict[str, float]:
    """Top-k accuracy (fractions) of class ``scores`` [N, C] -> ``{"top1": ., "top5": .}`` (k ≤ C)."""
    n = labels.numel()
    return {f"top{k}": float(h.double() / n) for k, h in topk_hits(scores, labels, tuple(ks)).items()}


class _TopkCounter:
    """Streamed :func:`topk_accuracy`: hit counts per k over batches of scores [B, C]."""

    def __init__(self, ks: Sequence[int] = _KS) -> None:
        self.ks = tuple(ks)
        self.hits = dict.fromkeys(self.ks, 0)
        self.n = 0

    def update(self, scores: Tensor, labels: Tensor) -> None:
        for k, h in topk_hits(scores, labels, self.ks).items():
            self.hits[k] += int(h)
        self.n += int(labels.numel())

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("top-k accuracy: no sample was scored")
        return {f"top{k}": self.hits[k] / self.n for k in self.ks}


def cc_scores(train_probs: Tensor, train_labels: Tensor, test_probs: Tensor, num_classes: int) -> Tensor:
    """−KL(p ‖ s^v) [N_test, C] with s^v the closed-form training centroids (Eq. 6); argmax = CC."""
    clf = NearestCentroidClassifier(num_classes=num_classes, allow_empty=True)
    clf.fit(train_probs.double(), train_labels)
    return -clf.kl_to_centroids(test_probs.double()).float()


# ---------------------------------------------------------------------------------------------------
# evaluate_image_model
# ---------------------------------------------------------------------------------------------------


@dataclass
class _TrainPass:
    """What one streamed pass over the un-augmented training set keeps."""

    n: int
    centroids: Tensor | None  # [C, D] float64 closed-form NSF centroids (CC), NaN rows for empty classes
    lp_x: Tensor | None  # [N, D] LP input (centred, L2-normalised), lp_dtype
    lp_y: Tensor | None  # [N]
    lp_mean: Tensor | None  # [D] float32 feature mean (non-NCMI LP)
    lp_kind: str | None


@torch.no_grad()
def _train_pass(
    backbone: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    ncmi: nn.Module | None,
    want_cc: bool,
    want_lp: bool,
    device: str | torch.device,
    channels_last: bool,
    lp_dtype: torch.dtype,
) -> _TrainPass:
    cents: CentroidAccumulator | None = None
    hint = _len_hint(loader, None)
    store = RowStore(lp_dtype, hint) if want_lp else None
    labels = RowStore(torch.long, hint)
    feat_sum: Tensor | None = None  # [D] float64 (non-NCMI LP mean)
    n = 0
    for out, y in _forward(backbone, loader, device=device, channels_last=channels_last):
        f = out.float()  # [B, D]
        n += int(y.numel())
        if want_cc:
            assert ncmi is not None
            p = ncmi.log_probs(f).exp().double()  # [B, D]
            if cents is None:
                cents = CentroidAccumulator(num_classes, p.shape[1])
            cents.update(p, y)
        if store is not None:
            labels.append(y)
            if ncmi is not None:
                store.append(ncmi.normalized(f).float())
            else:
                store.append(f)
                batch_sum = f.double().sum(dim=0)
                feat_sum = batch_sum if feat_sum is None else feat_sum + batch_sum
    if n == 0:
        raise ValueError("evaluate_image_model: the training loader yielded no batch")
    lp_x = lp_y = lp_mean = None
    kind = None
    if store is not None:
        lp_x, lp_y = store.tensor(), labels.tensor()
        kind = "ncmi_center_l2" if ncmi is not None else "train_mean_l2"
        if feat_sum is not None:
            lp_mean = (feat_sum / n).float().cpu()  # [D]
            center_normalize_(lp_x, lp_mean)
    return _TrainPass(
        n=n,
        centroids=cents.compute(allow_empty=True) if cents is not None else None,
        lp_x=lp_x,
        lp_y=lp_y,
        lp_mean=lp_mean,
        lp_kind=kind,
    )


def evaluate_image_model(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    num_classes: int,
    *,
    head: nn.Module | None = None,
    ncmi: nn.Module | None = None,
    protocols: Sequence[str] = _PROTOCOLS,
    lp: LinearProbeConfig | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    lp_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Top-1/top-5 for each requested protocol that applies, plus the test split's CMI/Γ/NCMI (streamed).

    ``train_loader`` must yield un-augmented training images (closed-form centroids, probe features).
    ``head`` applies to CE-family runs, ``cc`` to NCMI runs; ``lp`` to every run. ``lp_dtype``
    (float32 | float16) is the dtype of the stored training LP input (module docstring: memory). Returns
    ``{"protocols": {name: {"top1", "top5"}}, "ncmi_metric": {...}, "n_train", "n_test", "lp_input"}``.
    """
    unknown = set(protocols) - set(_PROTOCOLS)
    if unknown:
        raise ValueError(f"protocols must be among head, cc, lp; got {sorted(unknown)}")
    if lp_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lp_dtype must be float32, float16 or bfloat16, got {lp_dtype}")
    do_head = "head" in protocols and head is not None
    do_cc = "cc" in protocols and ncmi is not None
    do_lp = "lp" in protocols
    _eval_mode(backbone, head, ncmi)
    result: dict[str, Any] = {"protocols": {}}

    probe: nn.Linear | None = None
    train: _TrainPass | None = None
    if do_cc or do_lp:
        train = _train_pass(
            backbone, train_loader, num_classes, ncmi=ncmi, want_cc=do_cc, want_lp=do_lp,
            device=device, channels_last=channels_last, lp_dtype=lp_dtype,
        )  # fmt: skip
        result["n_train"] = train.n
        if do_lp:
            assert train.lp_x is not None and train.lp_y is not None
            probe = fit_linear_probe(train.lp_x, train.lp_y, num_classes, lp, device=device)
            result["lp_input"] = train.lp_kind
            train.lp_x = train.lp_y = None  # release the only per-sample tensor before the test pass

    counters = {name: _TopkCounter() for name, on in (("head", do_head), ("cc", do_cc), ("lp", do_lp)) if on}
    metric: NCMIMetricAccumulator | None = None
    n_test = 0
    with torch.no_grad():
        for out, y in _forward(backbone, test_loader, device=device, channels_last=channels_last):
            f = out.float()  # [B, D]
            n_test += int(y.numel())
            logits = head(f).float() if head is not None else None  # [B, C]
            if do_head:
                counters["head"].update(logits, y)
            probs = ncmi.log_probs(f).exp() if ncmi is not None else None  # [B, D]
            if do_cc:
                assert train is not None and train.centroids is not None and probs is not None
                kl = kl_rows_to_centroids(probs.double(), train.centroids.to(probs.device))  # [B, C]
                counters["cc"].update(-kl.float(), y)
            if probe is not None:
                assert train is not None
                if ncmi is not None:
                    z = ncmi.normalized(f).float()
                else:
                    assert train.lp_mean is not None
                    z = F.normalize(f - train.lp_mean.to(f.device), dim=1)
                counters["lp"].update(probe(z), y)
            p_metric = probs if probs is not None else (logits.softmax(dim=1) if logits is not None else None)
            if p_metric is not None:
                if metric is None:
                    metric = NCMIMetricAccumulator(num_classes, p_metric.shape[1])
                metric.update(p_metric, y)
    if n_test == 0:
        raise ValueError("evaluate_image_model: the test loader yielded no batch")
    result["n_test"] = n_test
    for name, counter in counters.items():
        result["protocols"][name] = counter.compute()
    if metric is not None and int((metric.class_counts > 0).sum()) > 1:
        result["ncmi_metric"] = metric.compute()
    return result


# ---------------------------------------------------------------------------------------------------
# classifier_ncmi (Figure 2)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_ncmi(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    limit: int | None = None,
) -> dict[str, float]:
    """Top-1/top-5 of a classifier's own scores and the dataset-level CMI/Γ/NCMI of its probabilities.

    ``model(x)`` returns either logits [B, C] (probabilities = their softmax, in float64) or a pair
    ``(scores [B, C], probs [B, D])`` for models whose simplex output is not a softmax over classes
    (an NCMI network: scores −KL to its centroids, probs the NSF point). Streamed: O(C·D) memory.
    ``limit`` stops after exactly that many samples.
    """
    model.eval()
    counter = _TopkCounter()
    metric: NCMIMetricAccumulator | None = None
    for out, y in _forward(model, loader, device=device, channels_last=channels_last, limit=limit):
        if isinstance(out, tuple):
            scores, probs = out[0].float(), out[1].double()
        else:
            scores = out.float()
            probs = out.double().softmax(dim=1)
        if scores.shape[1] != num_classes:
            raise ValueError(f"classifier_ncmi: model outputs {scores.shape[1]} classes, dataset has {num_classes}")
        counter.update(scores, y)
        if metric is None:
            metric = NCMIMetricAccumulator(num_classes, probs.shape[1])
        metric.update(probs, y)
    if metric is None:
        raise ValueError("classifier_ncmi: the loader yielded no batch")
    return {**counter.compute(), **metric.compute(), "n": counter.n}


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (tmp file + ``os.replace``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
