"""``MILModule``: train a MIL aggregator with a head loss (CE & co.) or with NCMI on the slide embedding.

``objective="head"``: logits = aggregator head(embedding), loss = ``create_loss(loss, **loss_kwargs)``, validation
scores softmax(logits). ``objective="ncmi"``: the head is removed and the NCMI objective is
:class:`~wsi_ncmi.training.ncmi_objective.NCMITraining`'s; validation scores are softmax(−KL(p ‖ q^v)) to the learned
centroids. The model's weighted auxiliary losses (AEM entropy, ASMIL alignment) are added in both cases. What is
logged: docs/ncmi_mil.md "Logged metrics"; how NCMI is trained (ξ step, DDP): its "Training code" section.

``class_weights`` (head objective only): a list [C] or ``"balanced"`` (:mod:`wsi_ncmi.training.head_loss`).
``input_norm``: the aggregator's transform of each bag before the network (``"bag_center"``: subtract the bag's
mean instance feature; :data:`wsi_ncmi.models.INPUT_NORMS`); kept in the checkpoint, so evaluation, prediction
and heatmaps apply it too.
``weight_average``: the fraction of the last epochs whose end-of-epoch weights are averaged into the final model
(0 = off; :mod:`wsi_ncmi.training.weight_average`), written into the weights before the last validation.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from wsi_ncmi.choices import check_choices
from wsi_ncmi.data.mil import MILDataModule
from wsi_ncmi.data.plain import PlainKwargs, check_plain_kwargs
from wsi_ncmi.errors import UserError
from wsi_ncmi.models import InputNorm, create_model
from wsi_ncmi.ncmi import NCMILoss

from .epoch_stats import TermSums, eval_record, gather_eval
from .head_loss import ClassWeights, build_head_loss, check_class_weights, set_balanced_weights
from .ncmi_objective import (
    CENTROID_INITS,
    CENTROID_OPTIMIZERS,
    CentroidInit,
    CentroidOptimizer,
    NCMIConfigError,
    NCMIHooks,
    NCMITraining,
)
from .optim import OptimizerName, ScheduleName, build_optimizer, build_scheduler, per_step
from .progress import run_length, training_progress
from .run_record import record_run
from .val_metrics import epoch_metrics
from .weight_average import CHECKPOINT_KEY, EpochWeightAverage, WeightAverageError

__all__ = ["OBJECTIVES", "CENTROID_OPTIMIZERS", "CENTROID_INITS", "MILModule", "Objective", "TrainingConfigError"]

Objective = Literal["head", "ncmi"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)


class TrainingConfigError(UserError):
    """Invalid MILModule arguments, or a module that does not match its data."""


class MILModule(NCMIHooks, pl.LightningModule):
    """LightningModule for slide-level MIL classification (see the module docstring).

    Public attributes used by evaluation: ``model`` (the aggregator; Identity head for NCMI), ``ncmi_loss``
    (``NCMILoss`` or None), ``ncmi_training`` (its :class:`NCMITraining` or None), ``objective``, ``hparams``,
    :meth:`embed`, :meth:`class_scores`.
    """

    #: what kind of checkpoint this module writes (``training.checkpoint.CHECKPOINT_KINDS``)
    CHECKPOINT_KIND = "mil"
    #: settings that define the network: a ``--ckpt_path`` whose values differ from the config's is refused
    STRUCTURE_HPARAMS = ("model", "model_kwargs", "objective", "in_dim", "num_classes", "input_norm")
    #: state-dict keys of checkpoints written before NCMITraining held the loss -> their names now
    NCMI_LEGACY_KEYS = {"ncmi_loss.": "ncmi_training.loss.", "xi_momentum": "ncmi_training.xi_momentum"}

    def __init__(
        self,
        model: str = "abmil",
        model_kwargs: PlainKwargs | None = None,
        in_dim: int = 1024,
        num_classes: int = 2,
        objective: Objective = "head",
        loss: str = "ce",
        loss_kwargs: PlainKwargs | None = None,
        ncmi_kwargs: PlainKwargs | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        centroid_optimizer: CentroidOptimizer = "sgd",
        centroid_lr: float = 0.1,
        centroid_momentum: float = 0.9,
        scheduler: ScheduleName = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        class_weights: ClassWeights = None,
        center_init_batches: int = 16,
        centroid_init: CentroidInit = "public",
        input_norm: InputNorm = "none",
        weight_average: float = 0.0,
    ) -> None:
        check_choices(MILModule, locals(), "MILModule", TrainingConfigError)
        super().__init__()
        check_plain_kwargs({"model_kwargs": model_kwargs, "loss_kwargs": loss_kwargs, "ncmi_kwargs": ncmi_kwargs},
                           "MILModule: ", TrainingConfigError)
        self.save_hyperparameters()
        if num_classes < 2:
            raise TrainingConfigError(f"MILModule: num_classes must be >= 2, got {num_classes}")
        check_class_weights(class_weights, num_classes, objective, TrainingConfigError)
        self.objective = objective
        self.num_classes = int(num_classes)
        self.model = create_model(model, in_dim=in_dim, num_classes=num_classes, **(model_kwargs or {}))
        self.model.set_input_norm(input_norm)  # before the aggregator, in training and at inference alike
        self.ncmi_training: NCMITraining | None = None
        if objective == "ncmi":
            self.model.reset_classifier(0)
            try:
                self.ncmi_training = NCMITraining(num_classes, self.model.embed_dim, ncmi_kwargs, centroid_optimizer,
                                                  centroid_lr, centroid_momentum, centroid_init, center_init_batches)
            except NCMIConfigError as err:
                raise TrainingConfigError(f"MILModule: {err}") from None
            self.criterion: torch.nn.Module | None = None
            self.loss_name = "ncmi"
        else:
            self.criterion = build_head_loss(loss, loss_kwargs, class_weights, num_classes, TrainingConfigError)
            self.loss_name = str(loss).lower()
        try:
            self.weight_average = EpochWeightAverage(weight_average)
        except WeightAverageError as err:
            raise TrainingConfigError(f"MILModule: {err}") from None
        self._eval_outputs: list[dict[str, Tensor]] = []
        self._train_sums = TermSums()  # Σ value·B of every loss term this epoch

    @property
    def ncmi_loss(self) -> NCMILoss | None:
        """The NCMI loss (ξ, the feature center) of an NCMI run, else None."""
        return self.ncmi_training.loss if self.ncmi_training is not None else None

    # ------------------------------------------------------------------------------- checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record_run(checkpoint, self._trainer)  # the run's seed and the training bags' provenance
        if self.weight_average.enabled:
            checkpoint[CHECKPOINT_KEY] = self.weight_average.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.weight_average.enabled and CHECKPOINT_KEY in checkpoint:  # a resumed fit continues the average
            self.weight_average.load_state_dict(checkpoint[CHECKPOINT_KEY])  # (WeightAverageError: a user error)

    # --------------------------------------------------------------------- NCMI center / ξ init pass
    def ncmi_embed_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Slide embeddings [B, E] (eval mode, on the device) and labels [B] of a training batch."""
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        return self.embed(batch["features"], batch.get("mask")).float(), batch["label"].long()

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the DDP ranks (``t`` itself in a single process or outside a trainer)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def embed(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Slide embeddings [B, E] of bags features [B, N, D] (eval mode, no grad; mode restored after)."""
        was_training = self.training
        self.eval()
        try:
            return self.model.forward_features(features.float(), mask).embedding
        finally:
            self.train(was_training)

    def class_scores(self, embedding: Tensor) -> Tensor:
        """Class scores [B, C] summing to 1: softmax(logits) (head) or softmax(−KL(p‖q^v)) (NCMI, ξ centroids)."""
        if self.ncmi_loss is None:
            return torch.softmax(self.model.forward_head(embedding).float(), dim=1)
        return torch.softmax(-self.centroid_kl(embedding), dim=1)

    def centroid_kl(self, embedding: Tensor) -> Tensor:
        """KL(p ‖ q^v) [B, C] to the nearest learned centroid of each class (NCMI objective only)."""
        if self.ncmi_loss is None:
            raise TrainingConfigError("MILModule.centroid_kl: only defined for objective='ncmi'")
        return self.ncmi_loss.centroid_kl(self.ncmi_loss.log_probs(embedding))  # [B, C]

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Class scores [B, C] for bags [B, N, D] (see :meth:`class_scores`)."""
        return self.class_scores(self.model.forward_features(features.float(), mask).embedding)

    # ------------------------------------------------------------------------------------- training
    def _objective(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """Named loss terms (``"loss"`` = total) and the embedding [B, E] of one batch."""
        # bags travel in their stored dtype (usually float16); compute starts from float32 on the device
        out = self.model(batch["features"].float(), batch.get("mask"))  # [B, N, D]
        target = batch["label"].long()
        if self.ncmi_training is not None:
            terms = dict(self.ncmi_training(out.embedding, target, self.ncmi_ddp_sum()))
        else:
            assert self.criterion is not None
            terms = dict(self.criterion(out.logits, target))
        main = terms.pop("loss")
        named = {self.loss_name: main, **{k: v for k, v in terms.items() if k != self.loss_name}}
        total = main
        for name, value in out.aux.items():
            total = total + value
            named[name] = value
        named["loss"] = total
        return named, out.embedding

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.model.set_progress(training_progress(self.trainer, self.current_epoch, self.global_step, batch_idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        named, _ = self._objective(batch)
        if self.ncmi_training is not None:
            self.ncmi_training.observe_train(batch["label"].long())
        bs = int(batch["label"].shape[0])
        self._train_sums.add(named, bs)
        if (self.global_step + 1) % max(1, int(self.trainer.log_every_n_steps)) == 0:
            # step values only every log_every_n_steps (the epoch means come from on-device sums, one sync)
            self.log_dict({f"train/{k}_step": v.detach().float() for k, v in named.items()}, on_step=True,
                          on_epoch=False, batch_size=bs)
            self.log("train/loss", named["loss"].detach().float(), on_step=True, on_epoch=False, batch_size=bs,
                     prog_bar=True, logger=False)
        return named["loss"]

    def on_train_start(self) -> None:
        if self.weight_average.enabled:
            self.weight_average.first_epoch(self.trainer.max_epochs)  # refuses a run without max_epochs
        super().on_train_start()  # (NCMIHooks: the center / ξ init pass)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.weight_average.enabled and batch_idx + 1 == self.trainer.num_training_batches:
            # after the epoch's last optimizer step, before its validation: the last epoch validates and
            # checkpoints the averaged weights
            self.weight_average.epoch_end(self, self.current_epoch, self.trainer.max_epochs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # (NCMIHooks: EMA centroids averaged over DDP ranks)
        self.model.on_after_optimizer_step()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()  # the online CC starts empty
        self._train_sums.reset()
        # training draws (instance subsets/dropout, balanced bag order) follow (seed, epoch): exact resume
        dm = getattr(self.trainer, "datamodule", None)
        if isinstance(dm, MILDataModule):
            dm.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        for key, value in self._train_sums.pop_means(self._sum_over_ranks):  # epoch means of the loss terms
            self.log(f"train/{key}_epoch", value, on_step=False, on_epoch=True)
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, logger=False, prog_bar=key == "loss")
        opt = self.optimizers()
        if not isinstance(opt, list):
            self.log("train/lr", float(opt.param_groups[0]["lr"]))

    # ---------------------------------------------------------------------------------- validation
    def _eval_step(self, batch: dict[str, Any]) -> None:
        named, emb = self._objective(batch)
        emb = emb.float()
        p = self.ncmi_loss.log_probs(emb).exp() if self.ncmi_loss is not None else None  # [B, D]
        self._eval_outputs.append(eval_record(self.class_scores(emb), batch["label"].long(), named["loss"],
                                              batch.get("slide_id"), p))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _gather(self, key: str) -> Tensor:
        """``key`` of every evaluated bag, once, from all ranks (:func:`~.epoch_stats.gather_eval`)."""
        return gather_eval(self._eval_outputs, key, self.trainer.world_size, self.all_gather)

    def _log_eval(self, stage: str) -> None:
        if not self._eval_outputs:
            return
        scores, labels = self._gather("scores"), self._gather("label")
        metrics = epoch_metrics(scores.cpu().numpy(), labels.cpu().numpy())
        metrics["loss"] = float(self._gather("loss").mean())
        if self.ncmi_training is not None:  # the scores are softmax(−KL to ξ): their accuracy is ξ's
            metrics.update(self.ncmi_training.eval_metrics(self._gather("p"), labels, metrics["accuracy"],
                                                           self._sum_over_ranks))
        self._eval_outputs = []
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", float(value), prog_bar=key in {"f1_plus_auc", "macro_auc"})

    # ---------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups: list[dict[str, Any]] = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        xi_group = self.ncmi_training.xi_param_group() if self.ncmi_training is not None else None
        if xi_group is not None:
            groups.append(xi_group)
        extra = [p for p in self.criterion.parameters() if p.requires_grad] if self.criterion is not None else []
        if extra:
            groups.append({"params": extra})
        optimizer = build_optimizer(hp.optimizer, groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total, epochs = run_length(self.trainer)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        return per_step(optimizer, build_scheduler(hp.scheduler, optimizer, total, warmup, hp.min_lr_ratio))

    # ------------------------------------------------------------------------------ data consistency
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        in_dim, n_cls = getattr(dm, "in_dim", None), getattr(dm, "num_classes", None)
        if in_dim is not None and int(in_dim) != int(self.hparams.in_dim):
            raise TrainingConfigError(
                f"MILModule: data has feature dim {in_dim} but the model was built for in_dim={self.hparams.in_dim}"
            )
        if n_cls is not None and int(n_cls) != self.num_classes:
            raise TrainingConfigError(
                f"MILModule: data has {n_cls} classes but the model was built for num_classes={self.num_classes}"
            )
        if stage == "fit" and self.hparams.class_weights == "balanced":
            assert self.criterion is not None
            set_balanced_weights(self.criterion, dm, self.num_classes, TrainingConfigError)
