"""AEM attention-entropy regulariser (Zhang et al., MICCAI 2025; NCMI.md §5).

    loss = λ · mean_b [ (1/H) Σ_h Σ_n a_{b,h,n} log a_{b,h,n} ]          (λ = 0.1)

i.e. λ times the negative entropy of the instance-attention distribution (not normalised by log N),
averaged over bags and divided by the number of heads H. Adding it to CE pushes attention to spread.

``attention`` is [B, N] or [B, H, N]: probabilities over instances (rows sum to 1 over valid entries), or
scores when ``from_logits=True`` (then a masked softmax is applied first). ``mask`` [B, N] bool marks the
valid (non-padded) instances; padded entries contribute nothing. ``lam`` is a plain attribute, so a
schedule (e.g. cosine annealing) can set it between steps. ``target`` is accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .registry import LossError, register_loss

__all__ = ["AttentionEntropy"]


@register_loss("aem_entropy")
class AttentionEntropy(nn.Module):
    input_kind = "attention"

    def __init__(self, lam: float = 0.1, from_logits: bool = False) -> None:
        super().__init__()
        self.lam = float(lam)
        self.from_logits = bool(from_logits)

    def forward(
        self, attention: Tensor, target: Tensor | None = None, mask: Tensor | None = None, **aux: Any
    ) -> dict[str, Tensor]:
        if not isinstance(attention, Tensor) or attention.ndim not in (2, 3):
            shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
            raise LossError(f"aem_entropy: attention must be [B, N] or [B, H, N], got {shape}")
        a = attention if attention.ndim == 3 else attention[:, None]  # [B, H, N]
        b, _, n = a.shape
        if mask is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=a.device)
        else:
            if mask.shape != (b, n):
                raise LossError(f"aem_entropy: mask must be [{b}, {n}], got {tuple(mask.shape)}")
            valid = mask.to(device=a.device, dtype=torch.bool)
        valid = valid[:, None, :]  # [B, 1, N]
        if self.from_logits:
            a = torch.softmax(a.masked_fill(~valid, float("-inf")), dim=-1)
        a = a.masked_fill(~valid, 0.0)
        neg_entropy = torch.special.xlogy(a, a).sum(dim=-1).mean(dim=-1).mean()  # Σ_n, ÷H, mean over bags
        return {"loss": self.lam * neg_entropy, "neg_entropy": neg_entropy}

    def extra_repr(self) -> str:
        return f"lam={self.lam}, from_logits={self.from_logits}"
