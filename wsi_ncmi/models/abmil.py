"""ABMIL (Ilse et al. 2018), gated-attention variant of the AEM/ACMIL/ASMIL family."""

from __future__ import annotations

from torch import Tensor

from .base import BagFeatures, MILAggregator
from .layers import DimReduction, GatedAttention, default_inner_dim
from .registry import register_model

__all__ = ["ABMIL"]


@register_model("abmil")
class ABMIL(MILAggregator):
    """DimReduction (Linear no bias + ReLU) -> gated attention (hidden 128) -> Σ a_k h_k -> Linear head.

    Args:
        in_dim: instance feature size D_in.
        num_classes: head outputs (0 = no head, logits are the embedding).
        inner_dim: D_inner (default from the encoder table: 1024 -> 512, ..., else in_dim // 2).
        attn_hidden: hidden width of the gated attention.
        dropout: dropout after DimReduction and inside the attention (0 = none, the reference default).
    """

    def __init__(self, in_dim: int, num_classes: int, inner_dim: int | None = None, attn_hidden: int = 128,
                 dropout: float = 0.0) -> None:
        inner = int(inner_dim) if inner_dim else default_inner_dim(in_dim)
        super().__init__(in_dim, num_classes, embed_dim=inner)
        self.reduce = DimReduction(in_dim, inner, dropout=dropout)
        self.attention = GatedAttention(inner, hidden=attn_hidden, dropout=dropout)

    def _forward_features(self, x: Tensor, mask: Tensor) -> BagFeatures:
        h = self.reduce(x)  # [B, N, E]
        _, attn = self.attention(h, mask)  # [B, N]
        emb = (attn.unsqueeze(1) @ h).squeeze(1)  # [B, E]
        return BagFeatures(embedding=emb, attention=attn, aux={})
