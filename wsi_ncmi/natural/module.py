"""Lightning module for the natural-image track: a ResNet trained with a head loss, NCMI or a contrastive loss.

``objective``: ``"head"`` (backbone → Linear head → ``create_loss(loss)`` on the logits), ``"ncmi"`` (no head;
the NCMI objective of :class:`~wsi_ncmi.training.ncmi_objective.NCMITraining` on the pooled feature [B, D], as in
``MILModule``) or ``"contrastive"`` (an embedding loss such as ``supcon`` on a projection of two views, plus a
linear head trained with CE on the *detached* feature as an online probe). The optimizer and its per-group lr
schedule: :mod:`wsi_ncmi.natural.optimizer`; what validation logs: :mod:`wsi_ncmi.natural.validation` and
docs/ncmi_mil.md "Logged metrics".
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from wsi_ncmi.choices import check_choices
from wsi_ncmi.data.plain import PlainKwargs, check_plain_kwargs
from wsi_ncmi.errors import UserError
from wsi_ncmi.natural.backbones import create_backbone
from wsi_ncmi.natural.contrastive import contrastive_terms, projection_head
from wsi_ncmi.natural.objective_loss import objective_loss
from wsi_ncmi.natural.optimizer import image_optimizers
from wsi_ncmi.natural.validation import ImageValidation
from wsi_ncmi.ncmi import NCMILoss
from wsi_ncmi.training.ncmi_objective import CentroidInit, NCMIConfigError, NCMIHooks, NCMITraining
from wsi_ncmi.training.optim import ScheduleName

__all__ = ["OBJECTIVES", "ImageModule", "ImageModuleError", "Objective"]


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
        check_plain_kwargs({"loss_kwargs": loss_kwargs, "ncmi_kwargs": ncmi_kwargs}, "model.", ImageModuleError)
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
            self.criterion = objective_loss(loss, loss_kwargs, objective, ImageModuleError)
        self.is_ncmi = objective == "ncmi"
        self.is_contrastive = objective == "contrastive"
        # head: the classifier for head losses, an online probe on detached features for supcon
        self.head: nn.Linear | None = None if self.is_ncmi else nn.Linear(self.feature_dim, num_classes)
        self.proj: nn.Module | None = None
        if self.is_contrastive:
            self.proj = projection_head(self.feature_dim, proj_dim)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self._val = ImageValidation(num_classes, self.ncmi_training, val_centroids)  # this validation epoch

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
            assert self.proj is not None and self.head is not None and self.criterion is not None
            out, total = contrastive_terms(x, y, self.forward_features, self.proj, self.head, self.criterion)
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
        centroids = (self.ncmi_training.train_cc.centroids(self._sum_over_ranks)  # [C, D] online train class means
                     if self.ncmi_training is not None else None)
        self._val = ImageValidation(self.num_classes, self.ncmi_training, self.hparams.val_centroids, centroids)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        feat = self.forward_features(x[:, 0] if x.ndim == 5 else x)  # [B, D]
        for name, value in self._val.batch(feat, y, self.head, self.criterion, self.is_contrastive).items():
            self.log(name, value, batch_size=y.shape[0], sync_dist=True, prog_bar=name == "val/top1")

    def on_validation_epoch_end(self) -> None:
        for name, value in self._val.end(self._sum_over_ranks if self._world_size() > 1 else None).items():
            self.log(name, value, sync_dist=False, rank_zero_only=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return image_optimizers(self)

    def describe(self) -> dict[str, Any]:
        """What a run used (logged into evaluation JSON): objective, loss, centroid mode, val CC source."""
        info: dict[str, Any] = {"objective": self.objective, "loss": self.loss_name, "backbone": self.hparams.backbone}
        if self.ncmi_training is not None:
            info.update(self.ncmi_training.describe(), val_centroids=self.hparams.val_centroids)
        return info
