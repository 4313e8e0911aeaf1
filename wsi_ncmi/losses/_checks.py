"""Input validation shared by the losses (errors are :class:`LossError`, a ``ValueError``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import LossError


def check_target(target: Tensor, batch: int, num_classes: int | None, who: str) -> None:
    if not isinstance(target, Tensor) or target.ndim != 1:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise LossError(f"{who}: target must be a 1-D tensor [B], got {shape}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise LossError(f"{who}: target must hold integer class labels, got {target.dtype}")
    if target.shape[0] != batch:
        raise LossError(f"{who}: target has {target.shape[0]} labels for a batch of {batch}")
    if num_classes is not None and target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise LossError(f"{who}: labels must be in [0, {num_classes - 1}], got range [{lo}, {hi}]")


def check_logits(logits: Tensor, target: Tensor, who: str) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise LossError(f"{who}: logits must be a 2-D tensor [B, C], got {shape}")
    if not logits.is_floating_point():
        raise LossError(f"{who}: logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise LossError(f"{who}: need at least 2 classes, got logits [B, {logits.shape[1]}]")
    if logits.shape[0] == 0:
        raise LossError(f"{who}: empty batch")
    check_target(target, logits.shape[0], logits.shape[1], who)
