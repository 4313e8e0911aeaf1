"""From features to the probability simplex: normalized sigmoid (NSF) and feature centering.

NCMI.md §1. A feature f ∈ R^D is centred by an EMA of the raw feature mean (:class:`FeatureCenter`),
L2-normalised and divided by a temperature, then mapped onto the simplex with the normalized sigmoid

    NSF(z)[j] = σ(z[j]) / Σ_i σ(z[i]),      σ = logistic sigmoid                     (paper Eq. 3)

whose logarithm is computed stably as ``logsigmoid(z) - logsumexp(logsigmoid(z))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.errors import UserError

__all__ = ["NCMIError", "nsf", "log_nsf", "FeatureCenter"]


class NCMIError(UserError):
    """Bad input to the NCMI core (wrong shape, label out of range, non-finite values, ...)."""


def log_nsf(z: Tensor, dim: int = -1) -> Tensor:
    """Log of the normalized sigmoid along ``dim``: ``logsigmoid(z) - logsumexp(logsigmoid(z))``.

    Finite for every finite ``z`` (no ``log`` of a rounded probability, no eps).
    """
    ls = F.logsigmoid(z)
    return ls - torch.logsumexp(ls, dim=dim, keepdim=True)


def nsf(z: Tensor, dim: int = -1) -> Tensor:
    """Normalized sigmoid along ``dim``: ``σ(z) / Σ σ(z)``; a point on the simplex (sums to 1)."""
    return log_nsf(z, dim=dim).exp()


class FeatureCenter(nn.Module):
    """EMA of the raw feature mean, subtracted from features (NCMI.md §1 step 1).

    * The first batch seen in training mode initialises ``c = mean_b f_b`` (buffer ``initialized``).
    * Later training batches update ``c <- m·c + (1-m)·mean_b f_b`` (detached) **before** it is subtracted.
    * In eval mode ``c`` is frozen (never initialised or updated); an uninitialised center is all zeros.
    * ``c`` and ``initialized`` are buffers, so they are saved in ``state_dict`` and follow ``.to()``.

    Under data parallelism each rank updates its own copy with its local batch mean.

    Batches of one sample (one bag per step, the MIL norm): the first-batch init makes ``f - c`` exactly 0
    for that sample, whose L2 normalisation has an enormous gradient. Initialise ``c`` from several
    samples first by calling :meth:`update` once with their stacked features (``MILModule`` does this
    with its ``center_init_batches``).
    """

    center: Tensor
    initialized: Tensor

    def __init__(self, dim: int, momentum: float = 0.9999) -> None:
        super().__init__()
        if dim < 1:
            raise NCMIError(f"FeatureCenter: dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise NCMIError(f"FeatureCenter: momentum must be in [0, 1], got {momentum}")
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(self.dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, f: Tensor) -> None:
        """Fold the batch mean of ``f`` [B, D] into the EMA (first call initialises)."""
        mean = f.detach().mean(dim=0).to(self.center.dtype)  # [D]
        ema = self.center * self.momentum + mean * (1.0 - self.momentum)
        # torch.where instead of an `if` so a CUDA step needs no host sync
        self.center.copy_(torch.where(self.initialized, ema, mean))
        self.initialized.fill_(True)

    def subtract(self, f: Tensor) -> Tensor:
        """``f - c`` without touching the EMA."""
        return f - self.center.to(f.dtype)

    def forward(self, f: Tensor) -> Tensor:  # f [B, D] -> [B, D]
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise NCMIError(f"FeatureCenter: expected features [B, {self.dim}], got {tuple(f.shape)}")
        if self.training and f.shape[0] > 0:
            self.update(f)
        return self.subtract(f)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, momentum={self.momentum}"
