"""One validation / test epoch of the natural-image ``ImageModule``: what each batch logs and the dataset-level
metric at the end.

Per batch (logged as batch means, synced over ranks): ``val/top1`` / ``val/top5`` of the class scores (head
logits; for NCMI the online train class means (``val_centroids="train"``) or ξ), for NCMI also the top-k of both
centroid sets (``val/xi_*``, ``val/cc_*``, names of :func:`~wsi_ncmi.training.ncmi_objective.metric_name`) and the
NCMI terms of the batch (``val/loss``, ``val/batch_*``); for head losses their terms, for contrastive runs the
probe's CE. At the end: CMI / Γ / NCMI over the whole split from p (NCMI) or softmax(logits), streamed as
[C, D] running sums (:class:`~wsi_ncmi.ncmi.NCMIMetricAccumulator`), none with fewer than two classes seen.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.metrics import topk_hits
from wsi_ncmi.ncmi import NCMIMetricAccumulator
from wsi_ncmi.training.ncmi_objective import Centroids, NCMITraining, SumFn, metric_name

__all__ = ["ImageValidation", "topk_logs"]


def topk_logs(centroids: Centroids | None, scores: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Top-1 / top-5 rates of ``scores`` [B, C] for labels [B]: ``val/top{k}`` (``centroids`` None) or the NCMI
    names of ``centroids`` ("xi" | "cc")."""
    n = y.shape[0]
    return {f"val/top{k}" if centroids is None else f"val/{metric_name(centroids, k)}": h.float() / n
            for k, h in topk_hits(scores, y, (1, 5)).items()}


class ImageValidation:
    """The batches of one validation / test epoch (see the module docstring).

    ``centroids`` [C, D]: the online train class means of the epoch before (NCMI; NaN rows for classes unseen,
    never the nearest), None when there are none yet.
    """

    def __init__(self, num_classes: int, ncmi_training: NCMITraining | None, val_centroids: str = "train",
                 centroids: Tensor | None = None) -> None:
        self.num_classes = num_classes
        self.ncmi_training = ncmi_training
        self.val_centroids = val_centroids
        self.centroids = centroids
        self._metric: NCMIMetricAccumulator | None = None  # streamed dataset-level CMI / Γ / NCMI

    def batch(self, feat: Tensor, y: Tensor, head: nn.Module | None = None, criterion: nn.Module | None = None,
              contrastive: bool = False) -> dict[str, Tensor]:
        """The logs of one batch of features [B, D] and labels [B] (see the module docstring)."""
        logs: dict[str, Tensor] = {}
        if self.ncmi_training is not None:
            loss = self.ncmi_training.loss
            out = self.ncmi_training(feat, y)
            log_p = loss.log_probs(feat)  # [B, D]
            probs = log_p.exp()
            xi_scores = -loss.centroid_kl(log_p)  # [B, C]
            logs.update(topk_logs("xi", xi_scores, y))
            main = xi_scores
            if self.centroids is not None:
                cc_scores = -self.ncmi_training.train_cc.kl(probs, self.centroids)  # [B, C] float64
                logs.update(topk_logs("cc", cc_scores, y))
                if self.val_centroids == "train":
                    main = cc_scores
            logs.update(topk_logs(None, main, y))
            for name, value in out.items():  # batch-level terms; val/cmi, val/gamma, val/ncmi are dataset-level
                logs["val/loss" if name == "loss" else f"val/batch_{name}"] = value
        else:
            assert head is not None
            logits = head(feat)
            probs = logits.float().softmax(dim=1)
            logs.update(topk_logs(None, logits, y))
            if contrastive:
                logs["val/probe_ce"] = F.cross_entropy(logits, y)
            else:
                assert criterion is not None
                logs.update({f"val/{name}": value for name, value in criterion(logits, y).items()
                             if isinstance(value, Tensor) and value.numel() == 1})
        if self._metric is None:
            self._metric = NCMIMetricAccumulator(self.num_classes, probs.shape[1])
        self._metric.update(probs.detach(), y.detach())  # [C, D] running sums, no per-sample storage
        return logs

    def end(self, sum_fn: SumFn | None = None) -> dict[str, float]:
        """``val/cmi``, ``val/gamma``, ``val/ncmi`` (finite values) over every batch so far (summed over the DDP
        ranks with ``sum_fn``), then start over; {} before any batch or with fewer than two classes."""
        acc, self._metric = self._metric, None
        if acc is None:
            return {}
        if sum_fn is not None:  # the metric's sums over all ranks' samples
            acc.reduce(sum_fn)
        if int((acc.class_counts > 0).sum()) < 2:
            return {}  # Γ needs two classes (tiny fast_dev_run batches)
        return {f"val/{name}": float(value) for name, value in acc.compute().items() if math.isfinite(value)}
