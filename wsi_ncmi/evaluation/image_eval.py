"""Evaluation of natural-image models: head, CC and LP top-1/top-5, dataset-level NCMI, Figure-2 study.

Protocols (NCMI.md §3):
* ``head`` — the trained linear classifier (CE-family runs, the SupCon online probe).
* ``cc`` — NCMI runs: closed-form class centroids s^v = mean of p over the **un-augmented training set**
  (paper Eq. 6), predict argmin_v KL(p ‖ s^v); class scores −KL for top-5.
* ``lp`` — frozen backbone, NSF dropped: a torch ``nn.Linear`` trained with CE (SGD + momentum, cosine,
  fixed recipe below) on the centred, L2-normalised feature. For NCMI runs the center is the loss's
  EMA feature center (``NCMILoss.normalized``); for other runs it is the training-set feature mean.

These functions take the pieces of a model (backbone, optional head, optional NCMI loss module) so this
layer does not depend on the training code. :func:`classifier_ncmi` measures a full classifier (head
top-1 and the NCMI of its softmax outputs), used by ``wsi-ncmi ncmi-metric`` for the paper's Figure 2.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text
from wsi_ncmi.ncmi import NearestCentroidClassifier, ncmi_metric

__all__ = [
    "ImageOutputs",
    "LinearProbeConfig",
    "extract_outputs",
    "topk_accuracy",
    "cc_scores",
    "fit_linear_probe",
    "evaluate_image_model",
    "classifier_ncmi",
    "pearson_r",
    "plot_ncmi_vs_top1",
    "write_json",
]

logger = logging.getLogger(__name__)


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
    """Run ``backbone`` (eval mode) over ``loader`` of ``(images [B, 3, H, W], labels [B])``."""
    backbone.eval()
    for m in (head, ncmi):
        if m is not None:
            m.eval()
    feats, labels, logits, probs, normed = [], [], [], [], []
    seen = 0
    for x, y in loader:
        if x.ndim == 5:  # two-view batches: evaluate the first view
            x = x[:, 0]
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f = backbone(x).float()  # [B, D]
        feats.append(f.cpu())
        labels.append(torch.as_tensor(y).cpu())
        if head is not None:
            logits.append(head(f).float().cpu())
        if ncmi is not None:
            probs.append(ncmi.log_probs(f).exp().cpu())
            normed.append(ncmi.normalized(f).float().cpu())
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    if not feats:
        raise ValueError("extract_outputs: the loader yielded no batch")
    return ImageOutputs(
        features=torch.cat(feats),
        labels=torch.cat(labels).long(),
        logits=torch.cat(logits) if logits else None,
        probs=torch.cat(probs) if probs else None,
        normalized=torch.cat(normed) if normed else None,
    )


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (fractions) of class ``scores`` [N, C] -> ``{"top1": ., "top5": .}`` (k ≤ C)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]
    return {f"top{k}": float(hit[:, : min(k, kmax)].any(dim=1).float().mean()) for k in ks}


def cc_scores(train_probs: Tensor, train_labels: Tensor, test_probs: Tensor, num_classes: int) -> Tensor:
    """−KL(p ‖ s^v) [N_test, C] with s^v the closed-form training centroids (Eq. 6); argmax = CC."""
    clf = NearestCentroidClassifier(num_classes=num_classes, allow_empty=True)
    clf.fit(train_probs.double(), train_labels)
    return -clf.kl_to_centroids(test_probs.double()).float()


@dataclass
class LinearProbeConfig:
    """Recipe of the torch linear probe (fixed; features are unit-norm so a large lr is used)."""

    epochs: int = 100
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0


def fit_linear_probe(
    x: Tensor, y: Tensor, num_classes: int, config: LinearProbeConfig | None = None, device: str | torch.device = "cpu"
) -> nn.Linear:
    """Train ``nn.Linear(D, C)`` with CE on fixed features ``x`` [N, D] (SGD + momentum, cosine lr)."""
    cfg = config or LinearProbeConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        layer = nn.Linear(x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    x, y = x.to(device), y.to(device).long()
    layer.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, x.shape[0], cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(layer(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    layer.eval()
    return layer


def _lp_inputs(train: ImageOutputs, test: ImageOutputs) -> tuple[Tensor, Tensor, str]:
    if train.normalized is not None and test.normalized is not None:
        return train.normalized, test.normalized, "ncmi_center_l2"
    mean = train.features.mean(dim=0, keepdim=True)  # [1, D]
    return F.normalize(train.features - mean, dim=1), F.normalize(test.features - mean, dim=1), "train_mean_l2"


def evaluate_image_model(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    num_classes: int,
    *,
    head: nn.Module | None = None,
    ncmi: nn.Module | None = None,
    protocols: Sequence[str] = ("head", "cc", "lp"),
    lp: LinearProbeConfig | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 for each requested protocol that applies, plus the test split's CMI/Γ/NCMI.

    ``train_loader`` must yield un-augmented training images (closed-form centroids, probe features).
    ``head`` applies to CE-family runs, ``cc`` to NCMI runs; ``lp`` to every run. Returns
    ``{"protocols": {name: {"top1", "top5"}}, "ncmi_metric": {...}, "n_train", "n_test", "lp_input"}``.
    """
    unknown = set(protocols) - {"head", "cc", "lp"}
    if unknown:
        raise ValueError(f"protocols must be among head, cc, lp; got {sorted(unknown)}")
    kw = dict(head=head, ncmi=ncmi, device=device, channels_last=channels_last)
    test = extract_outputs(backbone, test_loader, **kw)
    need_train = ("cc" in protocols and ncmi is not None) or "lp" in protocols
    train = extract_outputs(backbone, train_loader, **kw) if need_train else None
    result: dict[str, Any] = {"protocols": {}, "n_test": int(test.labels.numel())}
    if "head" in protocols and test.logits is not None:
        result["protocols"]["head"] = topk_accuracy(test.logits, test.labels)
    if "cc" in protocols and test.probs is not None and train is not None and train.probs is not None:
        scores = cc_scores(train.probs, train.labels, test.probs, num_classes)
        result["protocols"]["cc"] = topk_accuracy(scores, test.labels)
    if "lp" in protocols and train is not None:
        x_tr, x_te, kind = _lp_inputs(train, test)
        layer = fit_linear_probe(x_tr, train.labels, num_classes, lp, device=device)
        with torch.no_grad():
            scores = layer(x_te.to(device)).cpu()
        result["protocols"]["lp"] = topk_accuracy(scores, test.labels)
        result["lp_input"] = kind
    if train is not None:
        result["n_train"] = int(train.labels.numel())
    probs = test.probs if test.probs is not None else (test.logits.softmax(dim=1) if test.logits is not None else None)
    if probs is not None and test.labels.unique().numel() > 1:
        result["ncmi_metric"] = ncmi_metric(probs.double(), test.labels, num_classes=num_classes)
    return result


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
    """Top-1/top-5 of a classifier's own head and the dataset-level CMI/Γ/NCMI of its softmax outputs."""
    out = extract_outputs(model, loader, device=device, channels_last=channels_last, limit=limit)
    logits = out.features  # the model is a full classifier: its "feature" is the logits [N, C]
    if logits.shape[1] != num_classes:
        raise ValueError(f"classifier_ncmi: model outputs {logits.shape[1]} classes, dataset has {num_classes}")
    labels = out.labels
    if limit is not None:
        logits, labels = logits[:limit], labels[:limit]
    acc = topk_accuracy(logits, labels)
    metric = ncmi_metric(logits.double().softmax(dim=1), labels, num_classes=num_classes)
    return {**acc, **metric, "n": int(labels.numel())}


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (NaN for fewer than 2 points or zero variance)."""
    if len(x) != len(y):
        raise ValueError(f"pearson_r: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return float("nan")
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def plot_ncmi_vs_top1(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Scatter of NCMI (x) vs top-1 (y), one labelled point per row (``name``, ``ncmi``, ``top1``); PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs = [float(r["ncmi"]) for r in rows]
    ys = [100.0 * float(r["top1"]) for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(str(r["name"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("NCMI of softmax outputs")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or f"NCMI vs top-1 (Pearson r = {pearson_r(xs, ys):.3f})")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (tmp file + ``os.replace``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
