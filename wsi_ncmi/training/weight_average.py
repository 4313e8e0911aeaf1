"""Epoch weight averaging: the final model is the uniform mean of the weights at the end of the last epochs.

``EpochWeightAverage(fraction)`` averages the trainable parameters (the aggregator and, for NCMI, ξ) as they
are after the last optimizer step of each of the last ``ceil(fraction · max_epochs)`` epochs, and at the end of the
final epoch's training steps writes that mean into the live parameters, before the final validation, so the
last-epoch checkpoint, its validation metrics and everything evaluated from it (LP, CC, predictions) use the
averaged model. This is stochastic weight averaging (Izmailov et al., UAI 2018) on the run's own learning-rate
schedule, one snapshot per epoch. ``fraction = 0`` is off.

What is not averaged: buffers (the NCMI feature center, ASMIL's EMA anchor, which has ``requires_grad=False``)
and the optimizer state. The running mean is float64 on the parameters' device and travels in the checkpoint
(``checkpoint["weight_average"]``, tensors and ints only), so ``--ckpt_path last`` continues it exactly.

Use it with the last-epoch checkpoint (``--checkpoint.monitor null``): with a monitor, ``best.ckpt`` may be an
epoch from before the averaging (``last.ckpt`` holds the averaged model). Needs ``trainer.max_epochs``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from wsi_ncmi.errors import UserError

__all__ = ["CHECKPOINT_KEY", "EpochWeightAverage", "WeightAverageError"]

logger = logging.getLogger(__name__)

#: where the running mean travels in a Lightning checkpoint dictionary
CHECKPOINT_KEY = "weight_average"


class WeightAverageError(UserError):
    """An invalid weight-averaging setting, or a checkpoint whose running mean does not fit the model."""


class EpochWeightAverage:
    """Uniform mean of a module's trainable parameters at the end of each of the last epochs (module docstring)."""

    def __init__(self, fraction: float) -> None:
        fraction = float(fraction)
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise WeightAverageError(f"weight_average must be in [0, 1] (the fraction of the last epochs "
                                     f"averaged; 0 = off), got {fraction}")
        self.fraction = fraction
        self.count = 0  # snapshots folded so far
        self._mean: dict[str, Tensor] = {}  # name -> float64 running mean

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0

    def first_epoch(self, max_epochs: int | None) -> int:
        """Index of the first averaged epoch: ``max_epochs − ceil(fraction · max_epochs)`` (at least one epoch)."""
        if max_epochs is None or max_epochs <= 0:
            raise WeightAverageError("weight_average needs trainer.max_epochs (training by max_steps only cannot "
                                     "tell which epochs are the last ones)")
        return max_epochs - max(1, math.ceil(self.fraction * max_epochs))

    @staticmethod
    def _params(module: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def epoch_end(self, module: nn.Module, epoch: int, max_epochs: int | None) -> bool:
        """Fold the weights after epoch ``epoch``'s last optimizer step into the mean when the epoch is one of the
        averaged ones; after the final epoch, write the mean into ``module``. Returns True when it wrote it."""
        if not self.enabled or epoch < self.first_epoch(max_epochs):
            return False
        params = self._params(module)
        if self._mean and set(self._mean) != set(params):
            raise WeightAverageError(f"weight_average: the running mean holds {sorted(self._mean)[:3]}..., the "
                                     f"model's trainable parameters are {sorted(params)[:3]}...")
        self.count += 1
        for name, p in params.items():
            value = p.detach().to(torch.float64)
            mean = self._mean.get(name)
            if mean is None:
                self._mean[name] = value.clone()
            else:
                mean = self._mean[name] = mean.to(value.device)  # a resumed mean was loaded on the CPU
                mean.add_((value - mean) / self.count)
        if epoch + 1 < int(max_epochs or 0):
            return False
        for name, p in params.items():
            p.copy_(self._mean[name].to(p.device, p.dtype))
        logger.info("weight_average: the model is now the mean of the weights after the last %d epoch(s)",
                    self.count)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "count": self.count, "mean": dict(self._mean)}

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        """Continue from :meth:`state_dict` (a resumed fit); refuses a state of another fraction."""
        if float(state.get("fraction", -1.0)) != self.fraction:
            raise WeightAverageError(f"{where}: its weight average was taken with fraction {state.get('fraction')}, "
                                     f"this run asks for {self.fraction}")
        mean = state.get("mean", {})
        if not isinstance(mean, dict) or not all(isinstance(v, Tensor) for v in mean.values()):
            raise WeightAverageError(f"{where}: '{CHECKPOINT_KEY}' does not hold a mean of tensors")
        self.count = int(state.get("count", 0))
        self._mean = {str(k): v.to(torch.float64) for k, v in mean.items()}
