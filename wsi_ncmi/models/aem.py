"""AEM (Zhang et al., MICCAI 2025): attention-entropy-maximisation regulariser on a cross-attention MIL.

Architecture (the public repo's default): DimReduction -> one learnable query (init N(0, 1e-6)) doing 8-head
cross-attention over the instances (q/k/v/out projections, dropout 0.1, LayerNorm) -> embedding D_inner ->
Linear head. Regulariser (training mode only, in ``aux["aem_entropy"]``, already weighted):
``λ · mean_b (1/H) Σ_h Σ_n a_bhn log a_bhn`` (negative entropy, not normalised by log N), so minimising the
loss maximises the attention entropy. λ follows ``lambda_schedule``: ``"constant"`` or ``"cosine"``
(λ0 · ½(1 + cos(π·progress)), annealed to 0 over training; progress comes from :meth:`set_progress`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import BagFeatures, MILAggregator, MILConfigError
from .layers import CrossAttentionBlock, DimReduction, default_inner_dim
from .registry import register_model

__all__ = ["AEM", "LAMBDA_SCHEDULES"]

LAMBDA_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


def negative_entropy(attn: Tensor) -> Tensor:
    """``attn [B, H, N]`` -> ``mean_b (1/H) Σ_h Σ_n a log a`` (0 log 0 = 0, with a finite gradient)."""
    pos = attn > 0
    safe = torch.where(pos, attn, torch.ones_like(attn))
    return torch.where(pos, attn * safe.log(), torch.zeros_like(attn)).sum(dim=-1).mean(dim=-1).mean()


@register_model("aem")
class AEM(MILAggregator):
    """Single-query cross-attention MIL with the AEM negative-entropy regulariser.

    Args:
        in_dim, num_classes: see :class:`~wsi_ncmi.models.base.MILAggregator`.
        inner_dim: D_inner (default from the encoder table).
        num_heads: attention heads (8). dropout: 0.1. query_std: init std of the query (1e-6).
        aem_lambda: λ0 (0.1). lambda_schedule: ``"constant"`` | ``"cosine"``.
    """

    def __init__(self, in_dim: int, num_classes: int, inner_dim: int | None = None, num_heads: int = 8,
                 dropout: float = 0.1, query_std: float = 1e-6, aem_lambda: float = 0.1,
                 lambda_schedule: str = "constant") -> None:
        inner = int(inner_dim) if inner_dim else default_inner_dim(in_dim)
        super().__init__(in_dim, num_classes, embed_dim=inner)
        if lambda_schedule not in LAMBDA_SCHEDULES:
            raise MILConfigError(f"AEM: lambda_schedule={lambda_schedule!r} not in {sorted(LAMBDA_SCHEDULES)}")
        self.reduce = DimReduction(in_dim, inner)
        self.attention = CrossAttentionBlock(inner, num_queries=1, num_heads=num_heads, dropout=dropout,
                                             query_std=query_std)
        self.aem_lambda0 = float(aem_lambda)
        self.lambda_schedule = lambda_schedule
        self.progress = 0.0

    @property
    def aem_lambda(self) -> float:
        """Current λ = λ0 · schedule(progress)."""
        return self.aem_lambda0 * LAMBDA_SCHEDULES[self.lambda_schedule](self.progress)

    def set_progress(self, fraction: float) -> None:
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def _forward_features(self, x: Tensor, mask: Tensor) -> BagFeatures:
        h = self.reduce(x)  # [B, N, E]
        res = self.attention(h, mask)
        heads = res.attention[:, 0]  # [B, H, N]
        aux = {"aem_entropy": self.aem_lambda * negative_entropy(heads)} if self.training else {}
        return BagFeatures(embedding=res.out[:, 0], attention=heads.mean(dim=1), aux=aux,
                           attention_heads=heads)
