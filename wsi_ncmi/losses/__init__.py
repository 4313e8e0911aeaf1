"""Training objectives in one registry: ce, label_smoothing, focal, poly, squentropy, occe, milloss,
supcon, ncmi. ``create_loss(name, **kw)``; see :mod:`.registry` for the contract."""

from .classification import (
    CrossEntropy,
    FocalLoss,
    LabelSmoothingCE,
    MILLoss,
    OneColdCE,
    PolyLoss,
    Squentropy,
)
from .contrastive import SupConLoss
from .ncmi import NCMIObjective
from .registry import INPUT_KINDS, LossError, create_loss, list_losses, register_loss

__all__ = [
    "INPUT_KINDS",
    "CrossEntropy",
    "FocalLoss",
    "LabelSmoothingCE",
    "LossError",
    "MILLoss",
    "NCMIObjective",
    "OneColdCE",
    "PolyLoss",
    "SupConLoss",
    "Squentropy",
    "create_loss",
    "list_losses",
    "register_loss",
]
