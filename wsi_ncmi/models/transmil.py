"""TransMIL (Shao et al. 2021) with padding masks, any in_dim, and no N×N matrix at any bag size.

fc(D_in -> 512) + ReLU; per bag, the sequence of real tokens is squared (M = ceil(√n)², the first M − n real
tokens repeated) and a class token prepended; TransLayer -> PPEG -> TransLayer (TransLayer = pre-LayerNorm +
residual Nyström attention, 8 heads × 64, 256 landmarks, 6 pseudo-inverse iterations, depth-wise residual
conv kernel 33 on values, dropout 0.1, no FFN); final LayerNorm; embedding = class token (512).

Padding: squaring and PPEG are done per bag on real tokens only, and the batched Nyström attention masks
padded tokens (landmarks from real tokens only), so a padded batch equals each bag's own forward.

Heatmap attention: the **exact** softmax of the last layer's class-token query against the keys of the bag's
n real instances (class token and squaring repeats excluded, so it sums to 1 over real instances), averaged
over heads. It is O(n) and is not the class row of the Nyström approximation (which can be negative).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import BagFeatures, MILAggregator
from .layers import PPEG, NystromAttention
from .registry import register_model

__all__ = ["TransLayer", "TransMIL"]


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))``."""

    def __init__(self, dim: int, **attn_kw: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **attn_kw)

    def forward(self, x: Tensor, mask: Tensor, query0_key_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out, attn0 = self.attn(self.norm(x), mask, query0_key_mask)
        return x + out, attn0


@register_model("transmil")
class TransMIL(MILAggregator):
    """Args: dim (512), num_heads (8), dim_head (64), num_landmarks (256), pinv_iterations (6),
    residual_kernel (33), dropout (0.1)."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, num_heads: int = 8, dim_head: int = 64,
                 num_landmarks: int = 256, pinv_iterations: int = 6, residual_kernel: int = 33,
                 dropout: float = 0.1) -> None:
        super().__init__(in_dim, num_classes, embed_dim=dim)
        attn_kw = dict(num_heads=num_heads, dim_head=dim_head, num_landmarks=num_landmarks,
                       pinv_iterations=pinv_iterations, residual_kernel=residual_kernel, dropout=dropout)
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, dim))  # [1, dim]
        self.layer1 = TransLayer(dim, **attn_kw)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, **attn_kw)
        self.norm = nn.LayerNorm(dim)

    def _square_sequences(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[int]]:
        """Per bag: [cls, real tokens, first M−n real tokens again], right-padded to a batch.

        Returns seq ``[B, L, dim]``, seq mask ``[B, L]``, each bag's real positions in x, each grid side.
        """
        seqs, positions, sides = [], [], []
        for b in range(h.shape[0]):
            pos = mask[b].nonzero().squeeze(1)  # [n_b]
            side = math.isqrt(pos.numel() - 1) + 1  # ceil(sqrt(n_b))
            order = pos[torch.arange(side * side, device=h.device) % pos.numel()]  # [M_b]
            seqs.append(torch.cat([self.cls_token.to(h.dtype), h[b, order]], dim=0))  # [1 + M_b, dim]
            positions.append(pos)
            sides.append(side)
        seq = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [B, L, dim]
        lengths = torch.tensor([s.shape[0] for s in seqs], device=h.device)
        seq_mask = torch.arange(seq.shape[1], device=h.device)[None, :] < lengths[:, None]  # [B, L]
        return seq, seq_mask, positions, sides

    def _apply_ppeg(self, x: Tensor, sides: list[int]) -> Tensor:
        rows = []
        for b, side in enumerate(sides):
            m = side * side
            grid = self.ppeg(x[b : b + 1, 1 : 1 + m], side)[0]  # [M_b, dim]
            rows.append(torch.cat([x[b, :1], grid, x[b, 1 + m :]], dim=0))
        return torch.stack(rows)  # [B, L, dim]

    def _forward_features(self, x: Tensor, mask: Tensor) -> BagFeatures:
        h = self.fc(x)  # [B, N, dim]
        seq, seq_mask, positions, sides = self._square_sequences(h, mask)
        seq, _ = self.layer1(seq, seq_mask)
        seq = self._apply_ppeg(seq, sides)
        key_mask = torch.zeros_like(seq_mask)  # [B, L]: the n_b real instances right after the class token
        for b, pos in enumerate(positions):
            key_mask[b, 1 : 1 + pos.numel()] = True
        seq, attn0 = self.layer2(seq, seq_mask, key_mask)  # attn0 [B, H, L]
        emb = self.norm(seq)[:, 0]  # [B, dim]
        heads = attn0.new_zeros(x.shape[0], attn0.shape[1], x.shape[1])  # [B, H, N]
        for b, pos in enumerate(positions):
            heads[b][:, pos] = attn0[b, :, 1 : 1 + pos.numel()]
        return BagFeatures(embedding=emb, attention=heads.mean(dim=1), aux={}, attention_heads=heads)
