"""``NCMITraining``: how NCMI is trained, one component held by ``MILModule`` and the natural ``ImageModule``.

It owns the loss (``create_loss("ncmi")``, an :class:`~wsi_ncmi.ncmi.NCMILoss`, built here and nowhere else for
training), the ξ step
policy (``centroid_optimizer``: a manual SGD step after each backward, or a parameter group of the main
optimizer, and the ξ group's lr schedule), the center / ξ initialisation pass before the first training step
(``center_init_batches``, ``centroid_init``), the DDP handling of the feature center and of EMA centroids, the
online CC accumulator (class means of p over the epoch's training samples) and the names of the accuracies it
feeds (:data:`METRIC_NAMES`, documented in docs/ncmi_mil.md "Logged metrics"). :class:`NCMIHooks` is the
LightningModule mixin that calls it from Lightning's hooks.

``sum_fn`` is a sum over the DDP ranks (identity in a single process) given by the holding module.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from wsi_ncmi.choices import check_choices
from wsi_ncmi.errors import UserError
from wsi_ncmi.losses import LossError, create_loss
from wsi_ncmi.ncmi import CentroidAccumulator, NCMILoss, ncmi_metric
from wsi_ncmi.ncmi.centroids import kl_rows_to_centroids

from .optim import WarmupSchedule
from .val_metrics import epoch_metrics

__all__ = ["CENTROID_INITS", "CENTROID_OPTIMIZERS", "METRIC_NAMES", "CentroidInit", "CentroidOptimizer", "NCMIConfigError", "NCMIHooks", "NCMITraining",
           "OnlineClassMeans", "centroid_sgd_step", "global_mean", "metric_name",
           "rename_legacy_keys"]

logger = logging.getLogger(__name__)

CentroidOptimizer = Literal["sgd", "group"]
CentroidInit = Literal["public", "class_means"]
CENTROID_OPTIMIZERS: tuple[str, ...] = typing.get_args(CentroidOptimizer)
CENTROID_INITS: tuple[str, ...] = typing.get_args(CentroidInit)
#: the sets of centroids a nearest-centroid accuracy is measured with: "xi" = learned q = NSF(ξ), "cc" = online
#: class means
Centroids = Literal["xi", "cc"]
#: their top-1 accuracies' logged names
METRIC_NAMES = {"xi": "xi_accuracy", "cc": "cc_accuracy"}
#: the online CC's epoch metrics besides its accuracy, logged as ``<stage>/cc_<key>`` (MIL)
CC_EPOCH_KEYS = ("macro_f1", "macro_auc", "f1_plus_auc")

SumFn = Callable[[Tensor], Tensor]


class NCMIConfigError(UserError):
    """An invalid NCMI training setting (the holding module re-raises it as its own configuration error)."""


def metric_name(centroids: Centroids, k: int = 1) -> str:
    """The logged name (without ``val/``) of the top-``k`` accuracy of ``centroids`` ("xi" | "cc"):
    ``xi_accuracy`` / ``cc_accuracy`` for k = 1, ``xi_top5`` / ``cc_top5`` for k = 5."""
    check_choices(metric_name, {"centroids": centroids}, "metric_name", NCMIConfigError)
    return METRIC_NAMES[centroids] if k == 1 else f"{centroids}_top{k}"


def rename_legacy_keys(state_dict: MutableMapping[str, Any], prefix: str, renames: dict[str, str]) -> None:
    """Rename, in place, keys ``prefix + old`` → ``prefix + new`` (``old`` ending in "." renames a whole
    sub-module); a key whose new name is already present is left alone. For checkpoints written before a
    sub-module moved (a ``load_state_dict`` pre-hook of the holding module)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in renames.items():
            hit = rest.startswith(old) if old.endswith(".") else rest == old
            if hit and prefix + new + rest[len(old):] not in state_dict:
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


@torch.no_grad()
def global_mean(f: Tensor, sum_fn: SumFn) -> tuple[Tensor, int]:
    """Mean [D] of ``f`` [B, D] over the rows of every rank (all-reduced sums and counts) and the row count."""
    total = torch.cat([f.detach().float().sum(0), f.new_tensor([f.shape[0]], dtype=torch.float32)])  # [D+1]
    total = sum_fn(total)
    return total[:-1] / total[-1].clamp_min(1.0), int(total[-1])


@torch.no_grad()
def centroid_sgd_step(xi: Tensor, momentum: Tensor, lr: float, mu: float, scaler: Any = None) -> None:
    """ξ ← ξ − lr·buf with buf ← μ·buf + ∇ξ (paper Alg. 1), in place on ``xi`` [C*K, D] and ``momentum``
    [C*K, D]; unscales fp16 gradients (``scaler``: a GradScaler or None); skips a non-finite gradient.
    Clears ``xi.grad``; does nothing without a gradient."""
    if xi.grad is None:
        return
    grad = xi.grad
    if scaler is not None and scaler.is_enabled():
        grad = grad / scaler.get_scale()
    # a step with a non-finite gradient leaves ξ and the momentum as they were; chosen on the device
    # (torch.where), so the step costs no host sync
    finite = torch.isfinite(grad).all()
    buf = momentum * mu + grad  # [C*K, D]
    momentum.copy_(torch.where(finite, buf, momentum))
    xi.copy_(torch.where(finite, xi - lr * buf, xi))
    xi.grad = None


class OnlineClassMeans:
    """Class means of p over the epoch's training samples (as the model was when each went through): the CC
    protocol of NCMI.md §3 done online (nearest class mean by KL), float64 sums."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self._sums: CentroidAccumulator | None = None

    def reset(self) -> None:
        self._sums = None

    @property
    def count(self) -> int:
        """Training samples added since the last reset."""
        return 0 if self._sums is None or self._sums.counts is None else int(self._sums.counts.sum())

    @torch.no_grad()
    def update(self, log_p: Tensor, target: Tensor) -> None:
        """Add p [B, D] (from the loss's ln p of this batch) to the per-class sums of the epoch."""
        if self._sums is None:
            self._sums = CentroidAccumulator(self.num_classes, log_p.shape[1])
        # float64 sums and centroids; the loss already saw these labels (no per-step host sync here)
        self._sums.update(log_p.detach().double().exp(), target, check_labels=False)

    def centroids(self, sum_fn: SumFn | None = None) -> Tensor | None:
        """Class means [C, D] float64 over every rank (NaN rows: no sample this epoch); None before any sample."""
        if self._sums is None:
            return None
        return self._sums.compute(allow_empty=True, sum_fn=sum_fn)

    @staticmethod
    def kl(p: Tensor, centroids: Tensor) -> Tensor:
        """KL(p ‖ s^v) [N, C] in float64 for p [N, D] (inf for NaN rows of ``centroids``)."""
        return kl_rows_to_centroids(p.double().to(centroids.device), centroids)

    def scores(self, p: Tensor, sum_fn: SumFn | None = None) -> Tensor | None:
        """Class scores softmax(−KL(p ‖ s^v)) [N, C] float64 for p [N, D] (argmax = nearest class mean; 0 for a
        class with no sample this epoch); None before any training sample this epoch."""
        centroids = self.centroids(sum_fn)
        return None if centroids is None else torch.softmax(-self.kl(p, centroids), dim=1)

    def accuracy(self, p: Tensor, labels: Tensor, sum_fn: SumFn | None = None) -> float | None:
        """Accuracy of the nearest (KL) class mean for p [N, D]; None before any training sample this epoch."""
        scores = self.scores(p, sum_fn)  # [N, C]
        return None if scores is None else float((scores.argmax(1) == labels.to(scores.device)).double().mean())


class NCMITraining(nn.Module):
    """The NCMI objective of a LightningModule (see the module docstring).

    State: ``loss`` (ξ, the feature center) and, with the manual ξ step, ``xi_momentum`` [C*K, D].
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        ncmi_kwargs: dict[str, Any] | None = None,
        centroid_optimizer: CentroidOptimizer = "sgd",
        centroid_lr: float = 0.1,
        centroid_momentum: float = 0.9,
        centroid_init: CentroidInit = "public",
        center_init_batches: int = 0,
    ) -> None:
        check_choices(NCMITraining, locals(), "NCMITraining", NCMIConfigError)
        super().__init__()
        if center_init_batches < 0:
            raise NCMIConfigError(f"center_init_batches must be >= 0, got {center_init_batches}")
        try:  # the registry's NCMI loss (an NCMILoss): unknown options are named with the accepted ones
            loss = create_loss("ncmi", num_classes=num_classes, embed_dim=embed_dim, **(ncmi_kwargs or {}))
        except LossError as err:
            raise NCMIConfigError(f"ncmi_kwargs: {err}") from None
        assert isinstance(loss, NCMILoss)
        self.loss: NCMILoss = loss
        self.num_classes = int(num_classes)
        self.centroid_optimizer = centroid_optimizer
        self.centroid_lr = float(centroid_lr)
        self.centroid_momentum = float(centroid_momentum)
        self.centroid_init = centroid_init
        self.center_init_batches = int(center_init_batches)
        #: ξ takes the manual SGD step (paper Alg. 1) rather than being in the main optimizer
        self.manual_xi = self.loss.centroid_update == "sgd" and centroid_optimizer == "sgd"
        if self.manual_xi:
            self.register_buffer("xi_momentum", torch.zeros_like(self.loss.xi))  # [C*K, D]
        self.train_cc = OnlineClassMeans(num_classes)  # class sums of p over this epoch's training samples

    # ----------------------------------------------------------------------------------------- the loss
    def forward(self, features: Tensor, target: Tensor, sum_fn: SumFn | None = None) -> dict[str, Tensor]:
        """Loss terms ``{"loss", "cmi", "gamma"}`` of features [B, D] and labels [B]. ``sum_fn`` (DDP only): the
        center EMA is fed the global batch mean (sums and counts over the ranks), not this rank's."""
        center = self.loss.center if self.loss.use_centering else None
        if sum_fn is None or center is None or not center.training:
            return self.loss(features, target)
        center.update(global_mean(features, sum_fn)[0][None])
        center.eval()  # keep the loss from updating it again with the local batch
        try:
            return self.loss(features, target)
        finally:
            center.train()

    # ------------------------------------------------------------------------------- the ξ step policy
    def xi_param_group(self, **settings: Any) -> dict[str, Any] | None:
        """ξ's parameter group for the main optimizer (lr ``centroid_lr``, no weight decay, plus ``settings``),
        or None when ξ is not optimised there (manual step, ``frozen`` or ``ema`` centroids)."""
        xi = self.loss.xi
        if self.manual_xi or not xi.requires_grad:
            return None
        return {"params": [xi], "lr": self.centroid_lr, "weight_decay": 0.0, **settings}

    @staticmethod
    def xi_schedule(main: WarmupSchedule, start_step: int = 0, follow_main: bool = False) -> WarmupSchedule:
        """The lr factor of ξ's group: 0 before ``start_step``, then the main schedule's shape
        (``follow_main``) or a constant."""
        if follow_main:
            return WarmupSchedule(main.shape, main.total_steps, main.warmup_steps, main.min_lr_ratio,
                                  main.milestones, main.gamma, start_step=start_step)
        return WarmupSchedule("constant", main.total_steps, start_step=start_step)

    def before_optimizer_step(self, scaler: Any = None) -> None:
        """The manual ξ step (:func:`centroid_sgd_step`) when ξ is not in the optimizer; ``scaler``: fp16 GradScaler."""
        if self.manual_xi:
            centroid_sgd_step(self.loss.xi, self.xi_momentum, self.centroid_lr, self.centroid_momentum, scaler)

    @torch.no_grad()
    def after_optimizer_step(self, mean_fn: SumFn | None = None) -> None:
        """DDP (``mean_fn``: a mean over the ranks) with ``ema`` centroids: each rank moved ξ with its own
        assignments, so ξ is averaged (an approximation of the global-batch EMA that keeps ranks identical)."""
        if mean_fn is not None and self.loss.centroid_update == "ema":
            self.loss.xi.copy_(mean_fn(self.loss.xi.detach().clone()))

    # --------------------------------------------------------------------- center / ξ initialisation pass
    @torch.no_grad()
    def init_from_training(
        self,
        loader: Callable[[], Iterable[Any]],
        embed_batch: Callable[[Any], tuple[Tensor, Tensor]],
        sum_fn: SumFn,
        fresh: bool,
    ) -> None:
        """Before the first training step: c = mean raw embedding of the first ``center_init_batches`` training
        batches (unless the center is already set, e.g. resumed) and, with ``centroid_init="class_means"`` on a
        ``fresh`` run (a resumed run has its ξ), ξ from the class means of the centred, L2-normalised embeddings
        of the whole training split. One no-grad pass for both; ``loader()`` is only called when needed.

        ``embed_batch(batch) -> (embedding [B, E] float32, labels [B] long)`` runs the model (eval mode, on the
        device); a batch past ``center_init_batches`` is not embedded unless ξ is initialised too.

        With one bag per batch, initialising c from the first training batch makes z = f − c exactly 0 for that
        bag, whose L2 normalisation then back-propagates a ~1e12 gradient that wrecks Adam's second-moment
        estimate; a mean over several samples avoids it. The EMA then continues as usual (NCMI.md §1).
        """
        loss = self.loss
        n_center = self.center_init_batches
        if not loss.use_centering or bool(loss.center.initialized):
            n_center = 0
        class_means = self.centroid_init == "class_means" and fresh
        if n_center <= 0 and not class_means:
            return
        embs, labels, center_rows = [], [], 0
        for i, batch in enumerate(loader()):
            if i >= n_center and not class_means:
                break
            emb, y = embed_batch(batch)
            embs.append(emb)  # [B, E]
            labels.append(y)
            if i < n_center:
                center_rows += emb.shape[0]
        if not embs:
            return
        emb = torch.cat(embs)  # [N, E]
        if center_rows:
            mean, n = global_mean(emb[:center_rows], sum_fn)  # [E], samples on all ranks
            loss.center.update(mean[None])  # first update initialises c = mean
            logger.info("NCMI feature center initialised from %d training samples", n)
        if class_means:
            z = loss.normalized(emb)  # [N, E], with the center just set
            y = torch.cat(labels)
            sums = torch.zeros(self.num_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
            counts = torch.bincount(y, minlength=self.num_classes).to(z.dtype)  # [C]
            total = sum_fn(torch.cat([sums, counts[:, None]], dim=1))  # [C, E + 1]
            counts = total[:, -1]
            loss.init_centroids_from_means(total[:, :-1] / counts.clamp_min(1.0)[:, None], counts > 0)
            logger.info("NCMI centroids ξ initialised from the class means of %d training samples (per class %s)",
                        int(counts.sum()), counts.long().tolist())

    # ----------------------------------------------------------------------------------- online CC
    def reset_epoch(self) -> None:
        """Start a training epoch: the online class means start empty."""
        self.train_cc.reset()

    def observe_train(self, target: Tensor) -> None:
        """Add the last training forward's p (the loss's own ln p, no second simplex pass) to the class means."""
        if self.loss.last_log_probs is not None:
            self.train_cc.update(self.loss.last_log_probs, target)

    def eval_metrics(self, p: Tensor, labels: Tensor, xi_accuracy: float, sum_fn: SumFn | None = None
                     ) -> dict[str, float]:
        """Epoch metrics of the evaluated samples' p [N, D] and labels [N]: the ξ accuracy (``xi_accuracy``, of
        the caller's scores), the online CC's accuracy, macro-F1, macro-AUC and their sum (``cc_f1_plus_auc``, a
        checkpoint monitor that does not depend on ξ; once a training epoch fed the class means) and, with two
        classes or more, the dataset-level CMI / Γ / NCMI (Γ = 0 with one class, e.g. the sanity check)."""
        metrics = {metric_name("xi"): xi_accuracy}
        scores = self.train_cc.scores(p, sum_fn)  # [N, C]
        if scores is not None:
            cc = epoch_metrics(scores.cpu().numpy(), labels.cpu().numpy())
            metrics[metric_name("cc")] = cc["accuracy"]
            metrics.update({f"cc_{key}": cc[key] for key in CC_EPOCH_KEYS})
        if labels.unique().numel() >= 2:
            metrics.update(ncmi_metric(p.cpu().double(), labels.cpu(), self.num_classes))
        return metrics

    def describe(self) -> dict[str, Any]:
        """The settings a run used (for evaluation JSON)."""
        loss = self.loss
        return {"centroid_update": loss.centroid_update, "variant": loss.variant, "use_nsf": loss.use_nsf,
                "use_centering": loss.use_centering, "centroid_optimizer": self.centroid_optimizer,
                "centroid_init": self.centroid_init, "center_init_batches": self.center_init_batches}


class NCMIHooks:
    """Mixin (before ``LightningModule`` in the bases) driving a module's ``ncmi_training`` from Lightning's hooks:
    the init pass at ``on_train_start``, the manual ξ step before each optimizer step, the DDP ξ average after it,
    the online CC reset per epoch, and old checkpoint keys (:attr:`NCMI_LEGACY_KEYS`) renamed on load.

    The module provides ``ncmi_training`` (None for other objectives), ``_sum_over_ranks(t)`` and
    :meth:`ncmi_embed_batch`.
    """

    #: state-dict keys written before the module held an ``NCMITraining`` -> their names now
    NCMI_LEGACY_KEYS: dict[str, str] = {}
    ncmi_training: NCMITraining | None

    def ncmi_embed_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(embedding [B, E] float32, labels [B] long) of a training batch, eval mode, no grad, on the device."""
        raise NotImplementedError

    def _ncmi_trainer(self) -> Any:
        return getattr(self, "_trainer", None)

    def ncmi_ddp_sum(self) -> SumFn | None:
        """``_sum_over_ranks`` under DDP (for ``ncmi_training(f, y, sum_fn)``: the center is fed the global batch
        mean), else None."""
        trainer = self._ncmi_trainer()
        return self._sum_over_ranks if trainer is not None and trainer.world_size > 1 else None  # type: ignore[attr-defined]

    def on_train_start(self) -> None:
        if self.ncmi_training is None:
            return
        trainer = self._ncmi_trainer()

        def loader() -> Any:
            dm = getattr(trainer, "datamodule", None)
            return dm.train_dataloader() if dm is not None else trainer.train_dataloader

        # a resumed run (global_step > 0) has its ξ from the checkpoint
        self.ncmi_training.init_from_training(loader, self.ncmi_embed_batch, self._sum_over_ranks,  # type: ignore[attr-defined]
                                              fresh=getattr(self, "global_step", 0) == 0)

    def on_train_epoch_start(self) -> None:
        if self.ncmi_training is not None:
            self.ncmi_training.reset_epoch()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.ncmi_training is not None:  # the manual ξ step, unscaled under an fp16 GradScaler
            scaler = getattr(getattr(self._ncmi_trainer(), "precision_plugin", None), "scaler", None)
            self.ncmi_training.before_optimizer_step(scaler)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # type: ignore[misc]
        trainer = self._ncmi_trainer()
        if self.ncmi_training is not None and trainer is not None and trainer.world_size > 1:
            self.ncmi_training.after_optimizer_step(lambda t: trainer.strategy.reduce(t, reduce_op="mean"))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.ncmi_training is not None:
            rename_legacy_keys(state_dict, prefix, self.NCMI_LEGACY_KEYS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
