"""The NCMI objective in the loss registry: ``create_loss("ncmi", num_classes=C, embed_dim=D, ...)``.

A thin subclass of :class:`wsi_ncmi.ncmi.NCMILoss` (same parameters, buffers and state_dict keys)
whose ``forward`` follows the registry contract ``(embedding [B, D], target [B], **aux) -> dict``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..ncmi.loss import NCMILoss
from .registry import register_loss

__all__ = ["NCMIObjective"]


@register_loss("ncmi")
class NCMIObjective(NCMILoss):
    input_kind = "embedding"

    def forward(self, features: Tensor, target: Tensor, **aux: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return super().forward(features, target)
