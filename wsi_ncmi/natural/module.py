"""Lightning module for the natural-image track: a ResNet trained with a head loss, NCMI or a contrastive loss.

``objective``: ``"head"`` (backbone → Linear head → ``create_loss(loss)`` on the logits), ``"ncmi"`` (no head;
the NCMI objective of :class:`~wsi_ncmi.training.ncmi_objective.NCMITraining` on the pooled feature [B, D], as in
``MILModule``) or ``"contrastive"`` (an embedding loss such as ``supcon`` on a projection of two views, plus a
linear head trained with CE on the *detached* feature as an online probe). The lr schedule is
:mod:`wsi_ncmi.training.optim`'s, one schedule per parameter group. What is logged: docs/ncmi_mil.md
"Logged metrics".
"""

from __future__ import annotations

import logging
import math
import typing
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.choices import check_choices
from wsi_ncmi.data.plain import PlainKwargs, PlainValueError, check_plain
from wsi_ncmi.errors import UserError
from wsi_ncmi.losses import create_loss
from wsi_ncmi.metrics import topk_hits
from wsi_ncmi.natural.backbones import create_backbone
from wsi_ncmi.ncmi import NCMILoss, NCMIMetricAccumulator
from wsi_ncmi.training.ncmi_objective import (
    CentroidInit,
    NCMIConfigError,
    NCMIHooks,
    NCMITraining,
    metric_name,
)
from wsi_ncmi.training.optim import ScheduleName, WarmupSchedule, build_group_scheduler

__all__ = ["OBJECTIVES", "ImageModule", "ImageModuleError", "Objective"]

logger = logging.getLogger(__name__)


class ImageModuleError(UserError):
    """Bad ImageModule configuration (names the argument)."""


Objective = Literal["head", "ncmi", "contrastive"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)


class ImageModule(NCMIHooks, L.LightningModule):
    """ResNet + objective for CIFAR-100 / ImageNet-style training (see the module docstring).

    Args:
        backbone: resnet18 | resnet34 | resnet50 | resnet101 (timm, random init unless ``weights``).
        num_classes: number of classes (linked from the datamodule by the CLI).
        objective: ``"head"``, ``"ncmi"`` or ``"contrastive"`` (see the module docstring).
        loss: registry loss name (``wsi_ncmi.losses.list_losses()``) for ``head`` (a logits loss) and
            ``contrastive`` (an embedding loss, e.g. ``supcon``); unused for ``ncmi``.
        loss_kwargs: extra keyword arguments of ``loss`` (e.g. ``{"gamma": 2.0}`` for focal).
        ncmi_kwargs: :class:`~wsi_ncmi.ncmi.NCMILoss` options (``tau``, ``center_momentum``, ``variant``,
            ``centroid_update``, ``centroids_per_class``, ``use_nsf``, ``use_centering`` — the last two are
            the paper's Table V ablation switches), as for MILModule.
        cifar_stem: 3×3 stride-1 stem, no max-pool (32-px images).
        weights: optional local weight file for the backbone.
        width: backbone channel multiplier (1.0 standard; smaller for CPU demos/tests).
        lr, momentum, weight_decay, nesterov: SGD for backbone + head.
        centroid_lr, centroid_momentum: SGD of the ξ param group (NCMI with ``centroid_update="sgd"``).
        centroid_init: ``"public"`` (the public code's axis init) or ``"class_means"`` (ξ from the training class
            means before the first step, one no-grad pass; as ``MILModule``).
        center_init_batches: set the NCMI feature center from the mean feature of this many training batches
            before the first step (0: the first training batch initialises it, as before).
        centroid_schedule: apply the lr schedule to the ξ group too (default: constant centroid lr).
        centroid_start_epoch: ξ keeps lr 0 before this epoch (the public CIFAR script starts at 30).
        scheduler: a :data:`wsi_ncmi.training.optim.SCHEDULES` name, stepped per optimizer step, after
            ``warmup_epochs``; ``none``: constant lr, no warm-up.
        milestones, lr_gamma: epochs (after the warm-up) at which the lr is multiplied by ``lr_gamma``.
        min_lr_ratio: floor of cosine / linear as a fraction of the base lr.
        val_centroids: ``"train"`` or ``"xi"``: which CC is reported as ``val/top1`` for NCMI.
        proj_dim: projection size of the contrastive objective.
        channels_last: run the backbone in channels-last memory format.
    """

    #: what kind of checkpoint this module writes (``training.checkpoint.CHECKPOINT_KINDS``)
    CHECKPOINT_KIND = "natural"
    #: settings that define the network: a ``--ckpt_path`` whose values differ from the config's is refused
    STRUCTURE_HPARAMS = ("backbone", "num_classes", "objective", "cifar_stem", "width", "proj_dim")
    #: state-dict keys of NCMI checkpoints written before NCMITraining held the loss -> their names now
    NCMI_LEGACY_KEYS = {"criterion.": "ncmi_training.loss."}

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 100,
        objective: Objective = "head",
        loss: str = "ce",
        loss_kwargs: PlainKwargs | None = None,
        ncmi_kwargs: PlainKwargs | None = None,
        cifar_stem: bool = True,
        weights: str | None = None,
        width: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        centroid_lr: float = 1.0,
        centroid_momentum: float = 0.9,
        centroid_schedule: bool = False,
        centroid_start_epoch: float = 0.0,
        scheduler: ScheduleName = "cosine",
        milestones: list[int] | None = None,
        lr_gamma: float = 0.2,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        val_centroids: Literal["train", "xi"] = "train",
        proj_dim: int = 128,
        channels_last: bool = True,
        centroid_init: CentroidInit = "public",
        center_init_batches: int = 0,
    ) -> None:
        check_choices(ImageModule, locals(), "ImageModule", ImageModuleError)
        super().__init__()
        for name, kwargs in (("loss_kwargs", loss_kwargs), ("ncmi_kwargs", ncmi_kwargs)):
            try:
                check_plain(kwargs, f"model.{name}")
            except PlainValueError as err:
                raise ImageModuleError(str(err)) from None
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ImageModuleError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if num_classes < 2:
            raise ImageModuleError(f"model.num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.objective = objective
        self.num_classes = num_classes
        self.backbone, self.feature_dim = create_backbone(backbone, cifar_stem=cifar_stem, weights=weights, width=width)
        self.ncmi_training: NCMITraining | None = None
        self.criterion: nn.Module | None = None
        if objective == "ncmi":
            self.loss_name = "ncmi"
            try:
                self.ncmi_training = NCMITraining(num_classes, self.feature_dim, ncmi_kwargs, "group", centroid_lr,
                                                  centroid_momentum, centroid_init, center_init_batches)
            except NCMIConfigError as err:
                raise ImageModuleError(f"model.{err}") from None
        else:
            self.loss_name = str(loss).lower()
            self.criterion = create_loss(loss, **(loss_kwargs or {}))
            kind = getattr(self.criterion, "input_kind", "logits")
            want = "logits" if objective == "head" else "embedding"
            if kind != want or hasattr(self.criterion, "xi"):
                raise ImageModuleError(
                    f"model.loss {loss!r} works on {kind}s; objective {objective!r} needs a loss on {want}s"
                    + (" (use objective='ncmi' for NCMI)" if hasattr(self.criterion, "xi") else "")
                )
        self.input_kind: str = "embedding" if self.criterion is None else getattr(self.criterion, "input_kind", "logits")
        self.is_ncmi = objective == "ncmi"
        self.is_contrastive = objective == "contrastive"
        # head: the classifier for head losses, an online probe on detached features for supcon
        self.head: nn.Linear | None = None if self.is_ncmi else nn.Linear(self.feature_dim, num_classes)
        self.proj: nn.Module | None = None
        if self.is_contrastive:
            d = self.feature_dim
            self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self._val_centroids: Tensor | None = None  # [C, D] online train class means for this val epoch
        self._val_metric: NCMIMetricAccumulator | None = None  # streamed dataset-level CMI / Γ / NCMI

    # ------------------------------------------------------------------------------ forward pieces
    @property
    def ncmi(self) -> NCMILoss | None:
        """The NCMILoss (holds ξ and the feature center) when ``objective == "ncmi"``, else None."""
        return self.ncmi_training.loss if self.ncmi_training is not None else None

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> pooled feature [B, D]."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores [B, C]: head logits, or −KL to the running centroids q = NSF(ξ) for NCMI."""
        feat = self.forward_features(x)
        if self.ncmi is not None:
            return self.ncmi.class_scores(feat)
        assert self.head is not None
        return self.head(feat)

    # ------------------------------------------------------------------------------ training
    @torch.no_grad()
    def ncmi_embed_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Features [B, D] (eval mode, first view, on the device) and labels [B] of a training batch."""
        x, y = batch
        x = x[:, 0] if x.ndim == 5 else x
        was_training = self.training
        self.eval()
        try:
            return self.forward_features(x.to(self.device)).float(), y.to(self.device).long()
        finally:
            self.train(was_training)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # [B, 3, H, W] (or [B, V, 3, H, W] for supcon), [B]
        bsz = y.shape[0]
        if self.is_contrastive:
            if x.ndim != 5:
                raise ImageModuleError("objective supcon needs two views: set data.two_views: true")
            views = x.shape[1]
            feat = self.forward_features(x.flatten(0, 1))  # [B*V, D]
            assert self.proj is not None and self.head is not None
            z = self.proj(feat).view(bsz, views, -1)  # [B, V, P]
            assert self.criterion is not None
            out = dict(self.criterion(z, y))
            probe = F.cross_entropy(self.head(feat.detach().view(bsz, views, -1)[:, 0]), y)
            out["probe_ce"] = probe
            total = out["loss"] + probe
        else:
            if x.ndim == 5:
                x = x[:, 0]
            feat = self.forward_features(x)  # [B, D]
            if self.ncmi_training is not None:
                out = dict(self.ncmi_training(feat, y, self.ncmi_ddp_sum()))
                self.ncmi_training.observe_train(y)  # the loss's own ln p of this batch, into the online CC
            else:
                assert self.head is not None and self.criterion is not None
                out = dict(self.criterion(self.head(feat), y))
            total = out["loss"]
        for name, value in out.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bsz)
        return total

    # ------------------------------------------------------------------------------ validation
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        if self._world_size() > 1:
            return self.all_gather(t).sum(dim=0)
        return t

    def on_validation_epoch_start(self) -> None:
        self._val_metric = None
        self._val_centroids = None
        if self.ncmi_training is not None:  # classes unseen this epoch get NaN rows: never the nearest
            self._val_centroids = self.ncmi_training.train_cc.centroids(self._sum_over_ranks)

    def _log_topk(self, centroids: str | None, scores: Tensor, y: Tensor) -> None:
        """Top-1 / top-5 of ``scores`` [B, C]: ``val/top{k}`` (``centroids`` None) or the NCMI names of
        ``centroids`` ("xi" | "cc", :func:`~wsi_ncmi.training.ncmi_objective.metric_name`)."""
        hits = topk_hits(scores, y, (1, 5))
        n = y.shape[0]
        for k, h in hits.items():
            name = f"val/top{k}" if centroids is None else f"val/{metric_name(centroids, k)}"
            self.log(name, h.float() / n, batch_size=n, sync_dist=True, prog_bar=name == "val/top1")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        if x.ndim == 5:
            x = x[:, 0]
        feat = self.forward_features(x)  # [B, D]
        n = y.shape[0]
        if self.ncmi_training is not None:
            loss = self.ncmi_training.loss
            out = self.ncmi_training(feat, y)
            log_p = loss.log_probs(feat)  # [B, D]
            probs = log_p.exp()
            xi_scores = -loss.centroid_kl(log_p)  # [B, C]
            self._log_topk("xi", xi_scores, y)
            main = xi_scores
            if self._val_centroids is not None:
                cc_scores = -self.ncmi_training.train_cc.kl(probs, self._val_centroids)  # [B, C] float64
                self._log_topk("cc", cc_scores, y)
                if self.hparams.val_centroids == "train":
                    main = cc_scores
            self._log_topk(None, main, y)
            for name, value in out.items():  # batch-level terms; val/cmi, val/gamma, val/ncmi are dataset-level
                key = "val/loss" if name == "loss" else f"val/batch_{name}"
                self.log(key, value, batch_size=n, sync_dist=True)
        else:
            assert self.head is not None
            logits = self.head(feat)
            probs = logits.float().softmax(dim=1)
            self._log_topk(None, logits, y)
            if self.is_contrastive:
                self.log("val/probe_ce", F.cross_entropy(logits, y), batch_size=n, sync_dist=True)
            else:
                assert self.criterion is not None
                for name, value in self.criterion(logits, y).items():
                    if isinstance(value, Tensor) and value.numel() == 1:
                        self.log(f"val/{name}", value, batch_size=n, sync_dist=True)
        if self._val_metric is None:
            self._val_metric = NCMIMetricAccumulator(self.num_classes, probs.shape[1])
        self._val_metric.update(probs.detach(), y.detach())  # [C, D] running sums, no per-sample storage

    def on_validation_epoch_end(self) -> None:
        acc, self._val_metric = self._val_metric, None
        if acc is None:
            return
        if self._world_size() > 1:  # the metric's sums over all ranks' samples
            acc.reduce(self._sum_over_ranks)
        if int((acc.class_counts > 0).sum()) < 2:
            return  # Γ needs two classes (tiny fast_dev_run batches)
        metric = acc.compute()
        for name, value in metric.items():
            if math.isfinite(value):
                self.log(f"val/{name}", float(value), sync_dist=False, rank_zero_only=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ------------------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """SGD param groups: backbone/head/projection (+ loss params except ξ) and, for NCMI, ξ alone."""
        hp = self.hparams
        xi = self.ncmi.xi if self.ncmi is not None else None
        main = [p for n, p in self.named_parameters() if p.requires_grad and not (xi is not None and p is xi)]
        groups: list[dict[str, Any]] = [
            {"name": "main", "params": main, "lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay}
        ]
        xi_group = (self.ncmi_training.xi_param_group(name="centroids", momentum=hp.centroid_momentum)
                    if self.ncmi_training is not None else None)
        if xi_group is not None:
            groups.append(xi_group)
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.SGD(self.param_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        trainer = self._trainer
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 1
        max_epochs = trainer.max_epochs if trainer is not None else None
        per_epoch = total / max_epochs if max_epochs and max_epochs > 0 else float(total)
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
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def describe(self) -> dict[str, Any]:
        """What a run used (logged into evaluation JSON): objective, loss, centroid mode, val CC source."""
        info: dict[str, Any] = {"objective": self.objective, "loss": self.loss_name, "backbone": self.hparams.backbone}
        if self.ncmi_training is not None:
            info.update(self.ncmi_training.describe(), val_centroids=self.hparams.val_centroids)
        return info
