"""MIL aggregators behind one contract (see :mod:`wsi_ncmi.models.base`) and a name registry.

Importing this package registers every aggregator; build one with
``create_model("abmil", in_dim=1024, num_classes=4)``.
"""

from . import abmil, aem, asmil, transmil  # noqa: F401  (importing registers each model)
from .base import INPUT_NORMS, BagFeatures, InputNorm, MILAggregator, MILConfigError, MILInputError, MILOutput
from .registry import create_model, list_models, register_model

__all__ = [
    "INPUT_NORMS",
    "BagFeatures",
    "InputNorm",
    "MILAggregator",
    "MILConfigError",
    "MILInputError",
    "MILOutput",
    "create_model",
    "list_models",
    "register_model",
]
