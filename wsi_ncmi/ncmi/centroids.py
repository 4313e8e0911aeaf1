"""Closed-form class centroids on the simplex and the nearest-centroid (CC) classifier.

NCMI.md §3 "CC": after training, s^v = mean of p over the training samples of class v (paper Eq. 6);
a sample is predicted as argmin_v KL(p ‖ s^v), with class scores softmax(−KL(p ‖ s^v)).

Empty classes: :func:`class_centroids` and :meth:`CentroidAccumulator.compute` raise :class:`NCMIError`
naming the empty classes unless ``allow_empty=True``, in which case those rows are NaN. The classifier
treats a NaN centroid as unreachable (KL = +inf, probability 0).

Inputs may be torch tensors, numpy arrays (or lists); the classifier returns numpy for numpy input, else torch.
Logs of centroids are taken after clamping at the dtype's smallest normal number, so KL stays finite
when a centroid coordinate is exactly 0; ``p ln p`` uses ``xlogy`` (0·ln 0 = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .simplex import NCMIError

__all__ = ["class_centroids", "CentroidAccumulator", "NearestCentroidClassifier", "kl_rows_to_centroids"]


def _as_tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        t = torch.from_numpy(np.asarray(x))
    else:
        raise NCMIError(f"{name} must be a torch.Tensor, numpy.ndarray or list, got {type(x).__name__}")
    return t if dtype is None else t.to(dtype)


def _check_pair(probs: Tensor, labels: Tensor, num_classes: int | None) -> None:
    if probs.ndim != 2:
        raise NCMIError(f"probs must be 2-D [N, D], got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise NCMIError(f"probs must be floating point, got {probs.dtype}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise NCMIError(
            f"labels must be 1-D with one label per row of probs ({probs.shape[0]}), got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise NCMIError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise NCMIError(f"labels must be in [0, {num_classes - 1}], got range [{lo}, {hi}]")


def _finish(sums: Tensor, counts: Tensor, allow_empty: bool) -> Tensor:
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty and not allow_empty:
        raise NCMIError(
            f"class_centroids: classes {empty} have no samples (pass allow_empty=True for NaN rows)"
        )
    cent = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
    if empty:
        cent[counts == 0] = float("nan")
    return cent


def class_centroids(probs: Tensor, labels: Tensor, num_classes: int, allow_empty: bool = False) -> Tensor:
    """s^v = mean of ``probs`` [N, D] over rows with label v -> [C, D] (Eq. 6), in ``probs``' dtype."""
    probs = _as_tensor(probs, "probs")
    labels = _as_tensor(labels, "labels").to(probs.device)
    _check_pair(probs, labels, num_classes)
    acc = probs.to(torch.float64)
    sums = torch.zeros(num_classes, probs.shape[1], dtype=torch.float64, device=probs.device)
    sums.index_add_(0, labels.long(), acc)  # [C, D]
    counts = torch.bincount(labels.long(), minlength=num_classes)  # [C]
    return _finish(sums, counts, allow_empty).to(probs.dtype)


class CentroidAccumulator:
    """Streaming :func:`class_centroids`: call ``update(probs, labels)`` per batch, then ``compute()``.

    Sums are kept in float64 on the device of the first batch; ``compute()`` returns the dtype of the
    first batch (float32 at least).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        if num_classes < 1 or dim < 1:
            raise NCMIError(
                f"CentroidAccumulator: num_classes and dim must be >= 1, got {num_classes}, {dim}"
            )
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.reset()

    def reset(self) -> None:
        self.sums: Tensor | None = None  # [C, D] float64
        self.counts: Tensor | None = None  # [C] int64
        self._dtype = torch.float32

    def update(self, probs: Tensor, labels: Tensor, check_labels: bool = True) -> None:
        """Add rows ``probs`` [B, D] with ``labels`` [B]. ``check_labels=False`` skips the label-range check,
        which costs a host sync per call on accelerators (for training loops whose loss saw the labels)."""
        probs = _as_tensor(probs, "probs")
        labels = _as_tensor(labels, "labels").to(probs.device)
        _check_pair(probs, labels, self.num_classes if check_labels else None)
        if probs.shape[1] != self.dim:
            raise NCMIError(f"CentroidAccumulator: probs have dim {probs.shape[1]}, expected {self.dim}")
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=probs.device)
            self.counts = torch.zeros(self.num_classes, dtype=torch.long, device=probs.device)
            self._dtype = torch.promote_types(probs.dtype, torch.float32)
        assert self.counts is not None
        lab = labels.long().to(self.sums.device)
        self.sums.index_add_(0, lab, probs.to(self.sums.device, torch.float64))
        self.counts += torch.bincount(lab, minlength=self.num_classes)

    def compute(self, allow_empty: bool = False, sum_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Centroids [C, D]; empty classes raise unless ``allow_empty`` (then NaN rows). ``sum_fn`` maps the
        running sums first (e.g. a sum over distributed ranks) without changing the accumulator."""
        if self.sums is None or self.counts is None:
            raise NCMIError("CentroidAccumulator.compute: no batch was added")
        sums, counts = (self.sums, self.counts) if sum_fn is None else (sum_fn(self.sums), sum_fn(self.counts))
        return _finish(sums, counts, allow_empty).to(self._dtype)


def kl_rows_to_centroids(probs: Tensor, centroids: Tensor) -> Tensor:
    """KL(p_i ‖ s_v) for probs [N, D], centroids [C, D] -> [N, C] in matmul form (no [N, C, D])."""
    tiny = torch.finfo(centroids.dtype).tiny
    finite = ~torch.isnan(centroids).any(dim=1)  # [C]
    safe = torch.where(finite[:, None], centroids, torch.ones_like(centroids))
    log_s = safe.clamp_min(tiny).log()  # [C, D]
    neg_ent = torch.special.xlogy(probs, probs).sum(dim=1)  # [N]
    kl = neg_ent[:, None] - probs @ log_s.T  # [N, C]
    return kl.masked_fill(~finite[None, :], float("inf"))


class NearestCentroidClassifier:
    """Predict argmin_v KL(p ‖ s^v) with s^v the class means of the fitting probabilities (CC protocol).

    ``fit(probs [N, D], labels [N])`` stores ``centroids_`` [C, D]; ``num_classes`` defaults to
    ``labels.max() + 1``. Torch in → torch out, numpy in → numpy out.
    """

    def __init__(self, num_classes: int | None = None, allow_empty: bool = False) -> None:
        self.num_classes = num_classes
        self.allow_empty = allow_empty
        self.centroids_: Tensor | None = None

    def fit(self, probs: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> NearestCentroidClassifier:
        p = _as_tensor(probs, "probs")
        y = _as_tensor(labels, "labels").to(p.device)
        n_cls = self.num_classes if self.num_classes is not None else int(y.max()) + 1
        self.centroids_ = class_centroids(p, y, n_cls, allow_empty=self.allow_empty)
        return self

    def _prepare(self, probs: Tensor | np.ndarray) -> tuple[Tensor, bool]:
        if self.centroids_ is None:
            raise NCMIError("NearestCentroidClassifier: call fit() before predicting")
        is_numpy = isinstance(probs, np.ndarray)
        p = _as_tensor(probs, "probs")
        if p.ndim != 2 or p.shape[1] != self.centroids_.shape[1]:
            raise NCMIError(
                f"NearestCentroidClassifier: probs must be [N, {self.centroids_.shape[1]}], got {tuple(p.shape)}"
            )
        dtype = torch.promote_types(p.dtype, self.centroids_.dtype)
        return p.to(dtype), is_numpy

    @staticmethod
    def _out(t: Tensor, is_numpy: bool) -> Tensor | np.ndarray:
        return t.cpu().numpy() if is_numpy else t

    def kl_to_centroids(self, probs: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """KL(p_i ‖ s_v) -> [N, C]."""
        p, is_numpy = self._prepare(probs)
        assert self.centroids_ is not None
        return self._out(kl_rows_to_centroids(p, self.centroids_.to(p.device, p.dtype)), is_numpy)

    def predict_proba(self, probs: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """softmax(−KL(p ‖ s_v)) over classes -> [N, C]."""
        p, is_numpy = self._prepare(probs)
        assert self.centroids_ is not None
        kl = kl_rows_to_centroids(p, self.centroids_.to(p.device, p.dtype))
        return self._out(torch.softmax(-kl, dim=1), is_numpy)

    def predict(self, probs: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """argmin_v KL(p ‖ s_v) -> [N] int64."""
        p, is_numpy = self._prepare(probs)
        assert self.centroids_ is not None
        kl = kl_rows_to_centroids(p, self.centroids_.to(p.device, p.dtype))
        return self._out(kl.argmin(dim=1), is_numpy)
