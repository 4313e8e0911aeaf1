"""Losses on classifier logits [B, C] with integer targets [B] (NCMI.md §4). All are batch means.

Notation: z = logits, p = softmax(z), p_t = p[y], CE = −log p_t.

* ``ce``               CE (optional per-class ``weight``: weighted mean Σ w_y CE / Σ w_y, as torch).
* ``label_smoothing``  CE against (1−ε)·onehot + ε/C (ε = 0.1; optional ``weight`` as torch).
* ``focal``            −(1 − p_t)^γ log p_t, γ = 2 (Lin et al. 2017; no α).
* ``poly``             Poly-1: CE + ε·(1 − p_t), ε = 1 (Leng et al. 2022).
* ``squentropy``       CE + (1/(C−1)) Σ_{j≠y} z_j² (Hui, Belkin & Wright 2023).
* ``occe``             CE + γ·OCCE, γ = 1; OCCE = −Σ_j ȳ_j log softmax(−z)_j with the one-cold target
                       ȳ_j = 0 for j = y and 1/(C−1) otherwise ("Learning Anti-Classes with One-Cold
                       Cross Entropy Loss"). ∂OCCE/∂z_j = ȳ_j − softmax(−z)_j per sample.
* ``milloss``          CE + λ·|H(p̄) − H(ŷ)|, λ = 50, with p̄ = batch mean of softmax(z) and ŷ the empirical
                       label distribution of the batch, H the Shannon entropy in nats (our reading of
                       "Mutual Information Learned Classifiers": the model's marginal label entropy is
                       pulled to the data's). With one sample per batch H(ŷ) = 0, so the term becomes λ·H(p)
                       (entropy minimisation): use batches of several samples.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_logits
from .registry import LossError, register_loss

__all__ = [
    "CrossEntropy",
    "LabelSmoothingCE",
    "FocalLoss",
    "PolyLoss",
    "Squentropy",
    "OneColdCE",
    "MILLoss",
]


def _weight_buffer(module: nn.Module, weight: Any) -> None:
    if weight is None:
        module.register_buffer("weight", None)
        return
    w = torch.as_tensor(weight, dtype=torch.float32).flatten()
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise LossError(f"{type(module).__name__}: weight must be finite, non-negative and not all zero")
    module.register_buffer("weight", w)


def _check_weight(module: nn.Module, logits: Tensor) -> Tensor | None:
    w = module.weight
    if w is not None and w.numel() != logits.shape[1]:
        raise LossError(
            f"{type(module).__name__}: weight has {w.numel()} entries for {logits.shape[1]} classes"
        )
    return None if w is None else w.to(logits.dtype)


class _LogitLoss(nn.Module):
    input_kind = "logits"

    def _prepare(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        check_logits(logits, target, type(self).__name__)
        return logits, target.long()


@register_loss("ce")
class CrossEntropy(_LogitLoss):
    """Cross entropy; ``weight`` [C] for class-imbalanced data (weighted mean, as torch)."""

    def __init__(self, weight: Any = None) -> None:
        super().__init__()
        _weight_buffer(self, weight)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        return {"loss": F.cross_entropy(logits, target, weight=_check_weight(self, logits))}


@register_loss("label_smoothing")
class LabelSmoothingCE(_LogitLoss):
    """CE with smoothed targets (1−ε)·onehot + ε/C."""

    def __init__(self, smoothing: float = 0.1, weight: Any = None) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise LossError(f"label_smoothing: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        _weight_buffer(self, weight)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        loss = F.cross_entropy(
            logits, target, weight=_check_weight(self, logits), label_smoothing=self.smoothing
        )
        return {"loss": loss}

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


@register_loss("focal")
class FocalLoss(_LogitLoss):
    """−(1 − p_t)^γ log p_t, batch mean."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise LossError(f"focal: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        log_pt = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # [B]
        pt = log_pt.exp()
        return {"loss": (-((1.0 - pt) ** self.gamma) * log_pt).mean()}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


@register_loss("poly")
class PolyLoss(_LogitLoss):
    """Poly-1: CE + ε·(1 − p_t), batch mean."""

    def __init__(self, epsilon: float = 1.0) -> None:
        super().__init__()
        self.epsilon = float(epsilon)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        log_pt = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)  # [B]
        ce = -log_pt.mean()
        poly = (1.0 - log_pt.exp()).mean()
        return {"loss": ce + self.epsilon * poly, "ce": ce, "poly": poly}

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


@register_loss("squentropy")
class Squentropy(_LogitLoss):
    """CE + mean over non-target classes of the squared logits, batch mean."""

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        c = logits.shape[1]
        ce = F.cross_entropy(logits, target)
        other = 1.0 - F.one_hot(target, c).to(logits.dtype)  # [B, C]
        sq = ((logits**2) * other).sum(dim=1).div(c - 1).mean()
        return {"loss": ce + sq, "ce": ce, "sq": sq}


@register_loss("occe")
class OneColdCE(_LogitLoss):
    """CE + γ·OCCE (anti-class one-cold cross entropy over softmax(−z)), batch mean."""

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        c = logits.shape[1]
        ce = F.cross_entropy(logits, target)
        cold = (1.0 - F.one_hot(target, c).to(logits.dtype)) / (c - 1)  # [B, C]  ȳ
        occe = -(cold * torch.log_softmax(-logits, dim=1)).sum(dim=1).mean()
        return {"loss": ce + self.gamma * occe, "ce": ce, "occe": occe}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


@register_loss("milloss")
class MILLoss(_LogitLoss):
    """CE + λ·|H(mean_b softmax(z_b)) − H(empirical label distribution of the batch)|."""

    def __init__(self, lam: float = 50.0) -> None:
        super().__init__()
        if lam < 0:
            raise LossError(f"milloss: lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def forward(self, logits: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        logits, target = self._prepare(logits, target)
        c = logits.shape[1]
        ce = F.cross_entropy(logits, target)
        log_p = torch.log_softmax(logits, dim=1)  # [B, C]
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])  # [C]
        h_model = -(log_marginal.exp() * log_marginal).sum()
        label_dist = torch.bincount(target, minlength=c).to(logits.dtype) / target.shape[0]  # [C]
        h_labels = -torch.special.xlogy(label_dist, label_dist).sum()
        gap = (h_model - h_labels).abs()
        return {"loss": ce + self.lam * gap, "ce": ce, "label_entropy": gap}

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
