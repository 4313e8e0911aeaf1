"""The SGD optimizer and per-group lr schedule of the natural-image ``ImageModule``.

Two parameter groups: ``main`` (backbone, head, projection and any loss parameter but ξ) and, for NCMI with
``centroid_update="sgd"``, ``centroids`` (ξ alone, its own lr / momentum, no weight decay). The main group follows
``scheduler`` (:mod:`wsi_ncmi.training.optim`, stepped per optimizer step after ``warmup_epochs``; milestones in
epochs after the warm-up); ξ is held at lr 0 before ``centroid_start_epoch``, then follows the main shape
(``centroid_schedule``) or stays constant.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from wsi_ncmi.training.ncmi_objective import NCMITraining
from wsi_ncmi.training.optim import WarmupSchedule, build_group_scheduler, per_step
from wsi_ncmi.training.progress import run_length

__all__ = ["image_optimizers", "image_param_groups"]

logger = logging.getLogger(__name__)


def image_param_groups(module: Any) -> list[dict[str, Any]]:
    """SGD param groups of an ``ImageModule``: ``main`` and, for NCMI, ``centroids`` (ξ alone)."""
    hp = module.hparams
    xi = module.ncmi.xi if module.ncmi is not None else None
    main = [p for n, p in module.named_parameters() if p.requires_grad and not (xi is not None and p is xi)]
    groups: list[dict[str, Any]] = [
        {"name": "main", "params": main, "lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay}
    ]
    xi_group = (module.ncmi_training.xi_param_group(name="centroids", momentum=hp.centroid_momentum)
                if module.ncmi_training is not None else None)
    if xi_group is not None:
        groups.append(xi_group)
    return groups


def image_optimizers(module: Any) -> dict[str, Any]:
    """What ``ImageModule.configure_optimizers`` returns: SGD over :func:`image_param_groups`, one schedule per
    group, stepped per optimizer step."""
    hp = module.hparams
    opt = torch.optim.SGD(image_param_groups(module), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
    total, epochs = run_length(module._trainer)
    per_epoch = total / epochs
    warmup = int(round(hp.warmup_epochs * per_epoch))
    if hp.scheduler == "none":  # constant lr, no warm-up (training.optim's meaning of "none")
        main = WarmupSchedule("constant", total)
    else:
        milestones = tuple(m * per_epoch for m in (hp.milestones or ()))  # epochs after warm-up -> steps
        main = WarmupSchedule(hp.scheduler, total, warmup, hp.min_lr_ratio, milestones, hp.lr_gamma)
    schedules = [main]
    if len(opt.param_groups) > 1:  # ξ: 0 before centroid_start_epoch, then the main shape or constant
        start = int(round(hp.centroid_start_epoch * per_epoch))
        schedules.append(NCMITraining.xi_schedule(main, start, follow_main=hp.centroid_schedule))
    sched = build_group_scheduler(opt, schedules)
    logger.info(
        "ImageModule: objective=%s, SGD lr=%s (%s, %d warm-up steps of %d), groups=%s",
        hp.objective, hp.lr, hp.scheduler, warmup, total, [g["name"] for g in opt.param_groups],
    )
    return per_step(opt, sched)
