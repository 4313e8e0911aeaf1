"""Optimizers and learning-rate schedules by name (registries, no if-chains).

``build_optimizer(name, param_groups, lr, weight_decay)`` and ``build_scheduler(name, optimizer,
total_steps, warmup_steps, min_lr_ratio)``. Schedules step once per optimizer step ("step" interval),
so they follow gradient accumulation and any number of epochs.

* ``cosine``: linear warm-up from 0 over ``warmup_steps``, then a half-cycle cosine from the base lr down
  to ``min_lr_ratio · base lr`` at ``total_steps`` (the AEM / ASMIL recipe with ``warmup_steps = 0``).
* ``linear``: the same warm-up, then linear decay to ``min_lr_ratio · base lr``.
* ``constant``: the warm-up, then the base lr.
* ``multistep``: the warm-up, then the base lr times ``gamma`` per milestone passed (the CIFAR recipe).
* ``none``: no scheduler at all.

``milestones`` (optimizer steps counted after the warm-up) multiply any shape by ``gamma`` once each;
``start_step`` holds a group at lr 0 before that step (e.g. centroids that start learning later).
Each parameter group keeps its own base lr (the factor multiplies it), so a centroid group with its own
lr follows the same shape; :func:`build_group_scheduler` gives each group its own :class:`WarmupSchedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from wsi_ncmi.errors import UserError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "OptimConfigError",
    "OptimizerName",
    "ScheduleName",
    "WarmupSchedule",
    "build_group_scheduler",
    "build_optimizer",
    "build_scheduler",
    "check_schedule",
    "per_step",
]


class OptimConfigError(UserError):
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
#: the registry's names as a type (jsonargparse validates them, ``--help`` lists them); built from its keys
OptimizerName = Literal[tuple(OPTIMIZERS)]  # type: ignore[valid-type]


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
    "multistep": lambda progress: 1.0,  # constant between milestones; the drops are WarmupSchedule's
    "none": None,
}
#: the schedule names as a type (jsonargparse validates them, ``--help`` lists them); built from the keys
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]


class WarmupSchedule:
    """lr factor at optimizer step ``s``: warm-up, then ``SCHEDULES[shape]`` over the remaining steps.

    A plain object (not a lambda) so ``LambdaLR.state_dict`` stores its settings in checkpoints.
    ``milestones``: steps after the warm-up (floats allowed) at each of which the factor is multiplied by
    ``gamma``; ``start_step``: the factor is 0 before it.
    """

    def __init__(
        self,
        shape: str,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        milestones: tuple[float, ...] = (),
        gamma: float = 0.1,
        start_step: int = 0,
    ) -> None:
        self.shape = shape
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr_ratio = float(min_lr_ratio)
        self.milestones = tuple(float(m) for m in milestones)
        self.gamma = float(gamma)
        self.start_step = max(0, int(start_step))

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        after = step - self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, after / span)
        fn = SCHEDULES[self.shape]
        assert fn is not None
        factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * fn(progress)
        return factor * self.gamma ** sum(after >= m for m in self.milestones)


def check_schedule(name: str, min_lr_ratio: float = 0.0) -> str:
    """The registry key of schedule ``name`` (lower case); :class:`OptimConfigError` for a bad name or ratio."""
    key = str(name).lower()
    if key not in SCHEDULES:
        raise OptimConfigError(f"scheduler: unknown name {name!r}; available: {', '.join(sorted(SCHEDULES))}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise OptimConfigError(f"scheduler: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return key


def build_scheduler(
    name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR | None:
    """A per-step ``LambdaLR`` for the named shape, or ``None`` for ``"none"``."""
    key = check_schedule(name, min_lr_ratio)
    if SCHEDULES[key] is None:
        return None
    return LambdaLR(optimizer, WarmupSchedule(key, total_steps, warmup_steps, min_lr_ratio))


def build_group_scheduler(optimizer: Optimizer, schedules: list[WarmupSchedule]) -> LambdaLR:
    """One per-step ``LambdaLR`` with its own :class:`WarmupSchedule` for each parameter group (in order)."""
    if len(schedules) != len(optimizer.param_groups):
        raise OptimConfigError(
            f"scheduler: {len(schedules)} schedules for {len(optimizer.param_groups)} parameter groups"
        )
    for sched in schedules:
        if SCHEDULES.get(sched.shape) is None:
            raise OptimConfigError(f"scheduler: a group schedule needs a shape, got {sched.shape!r}")
    return LambdaLR(optimizer, list(schedules))


def per_step(optimizer: Optimizer, scheduler: LambdaLR | None) -> Any:
    """What ``configure_optimizers`` returns: ``optimizer`` alone without a scheduler, else both, the scheduler
    stepped after every optimizer step."""
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
