"""The registry loss of ``ImageModule``'s ``head`` and ``contrastive`` objectives, checked against what the
objective feeds it: logits for ``head``, projected embeddings for ``contrastive``; NCMI is refused here (its own
objective, :class:`~wsi_ncmi.training.ncmi_objective.NCMITraining`, builds it)."""

from __future__ import annotations

from typing import Any

from torch import nn

from wsi_ncmi.losses import create_loss

__all__ = ["objective_loss"]


def objective_loss(loss: str, loss_kwargs: dict[str, Any] | None, objective: str, error: type[Exception]) -> nn.Module:
    """``create_loss(loss, **loss_kwargs)``; raises ``error`` naming ``model.loss`` when it works on the wrong
    input for ``objective``."""
    criterion = create_loss(loss, **(loss_kwargs or {}))
    kind = getattr(criterion, "input_kind", "logits")
    want = "logits" if objective == "head" else "embedding"
    if kind != want or hasattr(criterion, "xi"):
        raise error(
            f"model.loss {loss!r} works on {kind}s; objective {objective!r} needs a loss on {want}s"
            + (" (use objective='ncmi' for NCMI)" if hasattr(criterion, "xi") else "")
        )
    return criterion
