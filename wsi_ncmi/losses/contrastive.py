"""Supervised contrastive loss (Khosla et al. 2020, the L_out form) on embeddings of several views.

Inputs: ``features`` [B, V, D] (V views per sample; [B, D] is read as V = 1), ``target`` [B].
The B·V embeddings are L2-normalised; for anchor a with positives P(a) (same label, a excluded) and
all other embeddings A(a):

    ℓ_a = −(1/|P(a)|) Σ_{p∈P(a)} log( exp(u_a·u_p/τ) / Σ_{k∈A(a)} exp(u_a·u_k/τ) ),   τ = 0.1

and the loss is the mean of ℓ_a over anchors that have at least one positive (0 with a zero gradient
when no anchor has one). No extra τ/τ_base factor is applied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_target
from .registry import LossError, register_loss

__all__ = ["SupConLoss"]


@register_loss("supcon")
class SupConLoss(nn.Module):
    input_kind = "embedding"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise LossError(f"supcon: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, features: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:
        if not isinstance(features, Tensor) or features.ndim not in (2, 3):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise LossError(f"supcon: features must be [B, V, D] or [B, D], got {shape}")
        if features.ndim == 2:
            features = features[:, None]
        b, v, _ = features.shape
        check_target(target, b, None, "supcon")
        u = F.normalize(features.reshape(b * v, -1), dim=1)  # [N, D], N = B·V, sample-major
        labels = target.long().repeat_interleave(v)  # [N]
        sim = u @ u.T / self.temperature  # [N, N]
        eye = torch.eye(b * v, dtype=torch.bool, device=u.device)
        sim = sim.masked_fill(eye, float("-inf"))
        log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # [N, N]
        pos = (labels[:, None] == labels[None, :]) & ~eye  # [N, N]
        n_pos = pos.sum(dim=1)  # [N]
        pos_sum = log_prob.masked_fill(~pos, 0.0).sum(dim=1)  # [N]
        has = n_pos > 0
        per_anchor = -pos_sum[has] / n_pos[has]
        loss = per_anchor.mean() if per_anchor.numel() else 0.0 * u.sum()
        return {"loss": loss}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
