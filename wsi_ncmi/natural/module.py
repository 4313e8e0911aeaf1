"""Lightning module for the natural-image track: a ResNet trained with a head loss, NCMI or a contrastive loss.

``objective`` means what it means for :class:`~wsi_ncmi.training.MILModule` (plus ``"contrastive"``):

* ``"head"``: backbone → ``head`` Linear(D, C) → ``create_loss(loss, **loss_kwargs)`` on the logits
  (logits losses: ce, label_smoothing, focal, poly, squentropy, occe, milloss).
* ``"ncmi"``: no classifier; :class:`~wsi_ncmi.ncmi.NCMILoss` ``(num_classes, D, **ncmi_kwargs)`` on the
  pooled feature [B, D]. The centroid parameters ξ form their own SGD param group (``centroid_lr`` /
  ``centroid_momentum``, no weight decay, and by default no lr schedule), which is the paper's Alg. 1
  separate centroid optimizer expressed as a param group.
* ``"contrastive"``: an embedding loss (``loss="supcon"``): a projection MLP (D → D → ``proj_dim``) feeds it
  two views ``[B, 2, 3, H, W]``; a linear ``head`` trained with CE on the *detached* feature (an online
  probe, it cannot move the backbone) gives the per-epoch validation accuracy.

The lr schedule is :mod:`wsi_ncmi.training.optim`'s (``scheduler``: cosine | linear | constant | multistep |
none, per optimizer step, after ``warmup_epochs``; ``milestones`` in epochs after the warm-up, ``lr_gamma``),
one :class:`~wsi_ncmi.training.optim.WarmupSchedule` per param group.

Validation accuracy per epoch (``val/top1``, ``val/top5``):
* head losses and supcon: the linear head.
* ncmi: nearest-centroid (CC) on the simplex, argmin_v KL(p ‖ s^v). Two sets of centroids are logged:
  ``val/top1_cc`` uses closed-form centroids s^v = mean of p over the **training samples seen during
  the current epoch** (accumulated from the training batches with their augmentation while the network
  changes, so a cheap approximation of paper Eq. 6 — ``wsi-ncmi natural evaluate`` recomputes them
  exactly over the un-augmented training set); ``val/top1_xi`` uses the running learned centroids
  q = NSF(ξ) (nearest of the K centroids of a class). ``val_centroids`` picks which one is ``val/top1``
  (default ``"train"``; it falls back to ``"xi"`` before the first training epoch, e.g. sanity checks).
Dataset-level CMI / Γ / NCMI of the validation split (``val/cmi``, ``val/gamma``, ``val/ncmi``) use the
softmax of the head (head losses, contrastive probe) or the NSF probabilities (ncmi).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.data.plain import PlainKwargs, PlainValueError, check_plain
from wsi_ncmi.losses import create_loss
from wsi_ncmi.metrics import topk_hits
from wsi_ncmi.natural.backbones import create_backbone
from wsi_ncmi.ncmi import CentroidAccumulator, NCMIMetricAccumulator
from wsi_ncmi.ncmi.centroids import kl_rows_to_centroids
from wsi_ncmi.training.optim import SCHEDULES, WarmupSchedule, build_group_scheduler

__all__ = ["OBJECTIVES", "ImageModule", "ImageModuleError"]

logger = logging.getLogger(__name__)


class ImageModuleError(ValueError):
    """Bad ImageModule configuration (names the argument)."""


OBJECTIVES = ("head", "ncmi", "contrastive")


class ImageModule(L.LightningModule):
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

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 100,
        objective: str = "head",
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
        scheduler: str = "cosine",
        milestones: list[int] | None = None,
        lr_gamma: float = 0.2,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        val_centroids: str = "train",
        proj_dim: int = 128,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        for name, kwargs in (("loss_kwargs", loss_kwargs), ("ncmi_kwargs", ncmi_kwargs)):
            try:
                check_plain(kwargs, f"model.{name}")
            except PlainValueError as err:
                raise ImageModuleError(str(err)) from None
        if objective not in OBJECTIVES:
            raise ImageModuleError(f"model.objective must be one of {OBJECTIVES}, got {objective!r}")
        if scheduler not in SCHEDULES:
            raise ImageModuleError(f"model.scheduler must be one of {sorted(SCHEDULES)}, got {scheduler!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ImageModuleError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if val_centroids not in ("train", "xi"):
            raise ImageModuleError(f"model.val_centroids must be 'train' or 'xi', got {val_centroids!r}")
        if num_classes < 2:
            raise ImageModuleError(f"model.num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.objective = objective
        self.num_classes = num_classes
        self.backbone, self.feature_dim = create_backbone(backbone, cifar_stem=cifar_stem, weights=weights, width=width)
        if objective == "ncmi":
            self.loss_name = "ncmi"
            self.criterion = create_loss("ncmi", num_classes=num_classes, embed_dim=self.feature_dim,
                                         **(ncmi_kwargs or {}))  # fmt: skip
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
        self.input_kind: str = getattr(self.criterion, "input_kind", "logits")
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
        self._train_acc: CentroidAccumulator | None = None
        self._val_centroids: Tensor | None = None  # [C, D] closed-form train centroids for this val epoch
        self._val_metric: NCMIMetricAccumulator | None = None  # streamed dataset-level CMI / Γ / NCMI
        self._cc_source_logged = False

    # ------------------------------------------------------------------------------ forward pieces
    @property
    def ncmi(self) -> nn.Module | None:
        """The NCMILoss (holds ξ and the feature center) when ``objective == "ncmi"``, else None."""
        return self.criterion if self.is_ncmi else None

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> pooled feature [B, D]."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores [B, C]: head logits, or −KL to the running centroids q = NSF(ξ) for NCMI."""
        feat = self.forward_features(x)
        if self.is_ncmi:
            return self.criterion.class_scores(feat)
        assert self.head is not None
        return self.head(feat)

    # ------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        if self.is_ncmi:
            self._train_acc = CentroidAccumulator(self.num_classes, self.feature_dim)

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
            out = dict(self.criterion(z, y))
            probe = F.cross_entropy(self.head(feat.detach().view(bsz, views, -1)[:, 0]), y)
            out["probe_ce"] = probe
            total = out["loss"] + probe
        else:
            if x.ndim == 5:
                x = x[:, 0]
            feat = self.forward_features(x)  # [B, D]
            if self.is_ncmi:
                out = dict(self.criterion(feat, y))
                if self._train_acc is not None and self.criterion.last_log_probs is not None:
                    with torch.no_grad():  # the loss's own ln p of this batch
                        self._train_acc.update(self.criterion.last_log_probs.exp(), y)
            else:
                assert self.head is not None
                out = dict(self.criterion(self.head(feat), y))
            total = out["loss"]
        for name, value in out.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bsz)
        return total

    # ------------------------------------------------------------------------------ validation
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if self._world_size() > 1:
            return self.all_gather(t).sum(dim=0)
        return t

    def on_validation_epoch_start(self) -> None:
        self._val_metric = None
        self._val_centroids = None
        acc = self._train_acc
        if self.is_ncmi and acc is not None and acc.sums is not None:
            # classes unseen this epoch get NaN rows: unreachable for kl_rows_to_centroids
            self._val_centroids = acc.compute(allow_empty=True, sum_fn=self._reduce_sum).float()

    def _log_topk(self, prefix: str, scores: Tensor, y: Tensor) -> None:
        hits = topk_hits(scores, y, (1, 5))
        n = y.shape[0]
        for k, h in hits.items():
            self.log(f"{prefix}{k}", h.float() / n, batch_size=n, sync_dist=True, prog_bar=prefix == "val/top" and k == 1)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        if x.ndim == 5:
            x = x[:, 0]
        feat = self.forward_features(x)  # [B, D]
        n = y.shape[0]
        if self.is_ncmi:
            out = self.criterion(feat, y)
            log_p = self.criterion.log_probs(feat)  # [B, D]
            probs = log_p.exp()
            xi_scores = -self.criterion.centroid_kl(log_p)  # [B, C]
            self._log_topk("val/top_xi", xi_scores, y)
            main = xi_scores
            if self._val_centroids is not None:
                cc_scores = -kl_rows_to_centroids(probs, self._val_centroids.to(probs.dtype))
                self._log_topk("val/top_cc", cc_scores, y)
                if self.hparams.val_centroids == "train":
                    main = cc_scores
            self._log_topk("val/top", main, y)
            for name, value in out.items():  # batch-level terms; val/cmi, val/gamma, val/ncmi are dataset-level
                key = "val/loss" if name == "loss" else f"val/batch_{name}"
                self.log(key, value, batch_size=n, sync_dist=True)
        else:
            assert self.head is not None
            logits = self.head(feat)
            probs = logits.float().softmax(dim=1)
            self._log_topk("val/top", logits, y)
            if self.is_contrastive:
                self.log("val/probe_ce", F.cross_entropy(logits, y), batch_size=n, sync_dist=True)
            else:
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
            acc.reduce(self._reduce_sum)
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
        xi = getattr(self.criterion, "xi", None) if self.is_ncmi else None
        main = [p for n, p in self.named_parameters() if p.requires_grad and not (xi is not None and p is xi)]
        groups: list[dict[str, Any]] = [
            {"name": "main", "params": main, "lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay}
        ]
        if xi is not None and xi.requires_grad:
            groups.append(
                {
                    "name": "centroids",
                    "params": [xi],
                    "lr": hp.centroid_lr,
                    "momentum": hp.centroid_momentum,
                    "weight_decay": 0.0,
                }
            )
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
            if hp.centroid_schedule:
                schedules.append(WarmupSchedule(main.shape, total, main.warmup_steps, main.min_lr_ratio,
                                                main.milestones, main.gamma, start_step=start))  # fmt: skip
            else:
                schedules.append(WarmupSchedule("constant", total, start_step=start))
        sched = build_group_scheduler(opt, schedules)
        logger.info(
            "ImageModule: objective=%s, SGD lr=%s (%s, %d warm-up steps of %d), groups=%s",
            hp.objective, hp.lr, hp.scheduler, warmup, total, [g["name"] for g in opt.param_groups],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def describe(self) -> dict[str, Any]:
        """What a run used (logged into evaluation JSON): objective, loss, centroid mode, val CC source."""
        info: dict[str, Any] = {"objective": self.objective, "loss": self.loss_name, "backbone": self.hparams.backbone}
        if self.is_ncmi:
            c = self.criterion
            info.update(
                centroid_update=c.centroid_update,
                variant=c.variant,
                use_nsf=c.use_nsf,
                use_centering=c.use_centering,
                val_centroids=self.hparams.val_centroids,
            )
        return info
