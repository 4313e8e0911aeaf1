"""Optimizers and learning-rate schedules by name (registries, no if-chains).

``build_optimizer(name, param_groups, lr, weight_decay)`` and ``build_scheduler(name, optimizer,
total_steps, warmup_steps, min_lr_ratio)``. Schedules step once per optimizer step ("step" interval),
so they follow gradient accumulation and any number of epochs.

* ``cosine``: linear warm-up from 0 over ``warmup_steps``, then a half-cycle cosine from the base lr down
  to ``min_lr_ratio · base lr`` at ``total_steps`` (the AEM / ASMIL recipe with ``warmup_steps = 0``).
* ``linear``: the same warm-up, then linear decay to ``min_lr_ratio · base lr``.
* ``constant``: the warm-up, then the base lr.
* ``none``: no scheduler at all.

Each parameter group keeps its own base lr (the factor multiplies it), so a centroid group with its own
lr follows the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimConfigError",
    "WarmupSchedule",
    "build_optimizer",
    "build_scheduler",
]


class OptimConfigError(ValueError):
    """An unknown optimizer / scheduler name or an invalid setting."""


def _sgd(groups: Iterable[dict[str, Any]], lr: float, weight_decay: float) -> Optimizer:
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=0.9)


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": lambda groups, lr, weight_decay: torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay),
    "adam": lambda groups, lr, weight_decay: torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay),
    "radam": lambda groups, lr, weight_decay: torch.optim.RAdam(
        groups, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True
    ),
    "sgd": _sgd,
}


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, weight_decay: float) -> Optimizer:
    """The named optimizer over ``param_groups`` (dicts with ``params`` and optional per-group settings)."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise OptimConfigError(f"optimizer: unknown name {name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    if not lr > 0:
        raise OptimConfigError(f"optimizer: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise OptimConfigError(f"optimizer: weight_decay must be >= 0, got {weight_decay}")
    return OPTIMIZERS[key](param_groups, lr=lr, weight_decay=weight_decay)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float], float] | None] = {
    "cosine": _cosine,
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
    "none": None,
}


class WarmupSchedule:
    """lr factor at optimizer step ``s``: warm-up, then ``SCHEDULES[shape]`` over the remaining steps.

    A plain object (not a lambda) so ``LambdaLR.state_dict`` stores its settings in checkpoints.
    """

    def __init__(self, shape: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        self.shape = shape
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        fn = SCHEDULES[self.shape]
        assert fn is not None
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * fn(progress)


def build_scheduler(
    name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR | None:
    """A per-step ``LambdaLR`` for the named shape, or ``None`` for ``"none"``."""
    key = str(name).lower()
    if key not in SCHEDULES:
        raise OptimConfigError(f"scheduler: unknown name {name!r}; available: {', '.join(sorted(SCHEDULES))}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptimConfigError(f"scheduler: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if SCHEDULES[key] is None:
        return None
    return LambdaLR(optimizer, WarmupSchedule(key, total_steps, warmup_steps, min_lr_ratio))
