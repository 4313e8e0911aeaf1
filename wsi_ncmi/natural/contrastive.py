"""The contrastive objective of the natural-image ``ImageModule``: an embedding loss (e.g. ``supcon``) on a
projection of two views, plus a linear head trained with CE on the *detached* feature of the first view, an
online probe of what the backbone learned (it never moves the backbone)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["contrastive_terms", "projection_head"]


def projection_head(dim: int, proj_dim: int) -> nn.Sequential:
    """Linear(D, D) → ReLU → Linear(D, P), the projection the embedding loss sees."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))


def contrastive_terms(x: Tensor, y: Tensor, forward_features: Callable[[Tensor], Tensor], proj: nn.Module,
                      probe: nn.Module, criterion: nn.Module) -> tuple[dict[str, Tensor], Tensor]:
    """(named terms with ``probe_ce``, total loss) of views ``x`` [B, V, 3, H, W] with labels ``y`` [B]."""
    bsz, views = y.shape[0], x.shape[1]
    feat = forward_features(x.flatten(0, 1))  # [B*V, D]
    z = proj(feat).view(bsz, views, -1)  # [B, V, P]
    out = dict(criterion(z, y))
    out["probe_ce"] = F.cross_entropy(probe(feat.detach().view(bsz, views, -1)[:, 0]), y)
    return out, out["loss"] + out["probe_ce"]
