"""The loss of ``MILModule``'s head objective, with its class weights.

``build_head_loss`` makes the registry loss (``create_loss(loss, **loss_kwargs)``) that works on logits, with a
``weight`` [C] when ``class_weights`` is given: a list [C], or ``"balanced"``: w_c = n / (C · n_c) from the
training split's label counts, filled in by :func:`set_balanced_weights` at ``setup("fit")`` and saved in
checkpoints (the loss's ``weight`` buffer). Errors are raised as the caller's ``error`` class.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from wsi_ncmi.losses import create_loss

__all__ = ["ClassWeights", "balanced_weights", "build_head_loss", "check_class_weights", "set_balanced_weights"]

logger = logging.getLogger(__name__)

ClassWeights = list[float] | Literal["balanced"] | None


def check_class_weights(class_weights: ClassWeights, num_classes: int, objective: str,
                        error: type[Exception]) -> None:
    """One weight per class, and only for the head objective."""
    if isinstance(class_weights, list | tuple) and len(class_weights) != num_classes:
        raise error(f"MILModule: class_weights has {len(class_weights)} entries for num_classes={num_classes}")
    if objective != "head" and class_weights is not None:
        raise error("MILModule: class_weights is only supported with objective='head'")


def build_head_loss(loss: str, loss_kwargs: dict[str, Any] | None, class_weights: ClassWeights, num_classes: int,
                    error: type[Exception]) -> nn.Module:
    """``create_loss(loss, **loss_kwargs, weight=...)``; refuses a loss that works on embeddings."""
    kw = dict(loss_kwargs or {})
    if class_weights == "balanced":  # placeholder until setup("fit") counts the training labels
        kw["weight"] = torch.ones(num_classes, dtype=torch.float32)
    elif class_weights is not None:
        kw["weight"] = torch.tensor(class_weights, dtype=torch.float32)
    try:
        criterion = create_loss(loss, **kw)
    except TypeError as exc:
        raise error(f"MILModule: loss {loss!r} rejected its arguments {sorted(kw)}: {exc}") from exc
    if getattr(criterion, "input_kind", "logits") != "logits":
        raise error(f"MILModule: loss {loss!r} works on embeddings; use objective='ncmi' or a logits loss")
    return criterion


def balanced_weights(labels: np.ndarray, num_classes: int, error: type[Exception]) -> tuple[torch.Tensor, np.ndarray]:
    """(w [C] = n / (C · n_c), counts n_c [C]) of integer ``labels`` [n]; every class must occur."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if (counts == 0).any():
        raise error(
            f"MILModule: class_weights='balanced' but the training split has no bag of class(es) "
            f"{np.flatnonzero(counts == 0).tolist()} (counts {counts.tolist()})"
        )
    return torch.as_tensor(len(labels) / (num_classes * counts), dtype=torch.float32), counts  # [C]


def set_balanced_weights(criterion: nn.Module, dm: Any, num_classes: int, error: type[Exception]) -> None:
    """:func:`balanced_weights` of ``dm.dataset("train").labels``, into ``criterion``'s ``weight`` buffer."""
    try:
        labels = np.asarray(dm.dataset("train").labels, dtype=np.int64)
    except AttributeError as exc:
        raise error("MILModule: class_weights='balanced' needs a datamodule with dataset('train').labels") from exc
    weight, counts = balanced_weights(labels, num_classes, error)
    criterion.weight.copy_(weight.to(criterion.weight.device))
    logger.info("balanced class weights %s from training counts %s", weight.tolist(), counts.tolist())
