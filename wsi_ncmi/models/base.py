"""The MIL aggregator contract: bag of instance features in, slide embedding (+ attention, aux losses) out.

Every aggregator splits into ``forward_features`` (bag -> :class:`BagFeatures`) and ``forward_head``
(embedding -> logits), timm style, so the NCMI loss can replace any head (``reset_classifier(0)``).

Conventions shared by all models:

- ``x`` is ``[B, N, D_in]``; ``mask`` is ``[B, N]`` bool with ``True`` = real instance (``None`` = all real).
  Padding must not change a bag's result: a padded batch equals each bag's unpadded forward.
- ``attention`` is ``[B, N]``: one score per instance, summing to 1 over the real instances of each bag and 0
  on padding (multi-head models average their heads; the per-head scores are in ``attention_heads``).
- ``aux`` holds extra loss terms that are **already weighted**: training adds them to the loss as they are.
  They are computed **only in training mode** (``model.train()``); in eval mode ``aux`` is empty, so
  inference never pays for regularisers (ASMIL's anchor is not run at inference).
- ``input_norm`` (:data:`INPUT_NORMS`, default ``"none"``) transforms each bag's features before the network:
  ``"bag_center"`` subtracts the bag's mean instance feature (real instances only; padding stays 0), so a shift
  shared by every tile of a slide — a centre's stain or scanner seen through the encoder — does not reach it.
- Input checks (:meth:`MILAggregator.check_input`) always run the shape checks. The value checks (NaN/inf
  anywhere in ``x``, padding included — pad with zeros; a bag whose mask is all False) cost one pass over
  ``x`` and one device sync; they run unless ``check_values`` is False and are skipped while
  ``torch.compile`` traces the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from wsi_ncmi.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["INPUT_NORMS", "BagFeatures", "InputNorm", "MILAggregator", "MILConfigError", "MILInputError", "MILOutput"]


class MILInputError(UserError):
    """A bag given to an aggregator is malformed (shape, dimension, mask or values)."""


class MILConfigError(UserError):
    """An aggregator was constructed with invalid arguments."""


@dataclass
class BagFeatures:
    """What ``forward_features`` returns."""

    embedding: Tensor  # [B, E] slide embedding
    attention: Tensor  # [B, N] one score per instance, sums to 1 over real instances, 0 on padding
    aux: dict[str, Tensor] = field(default_factory=dict)  # weighted extra loss terms (training mode only)
    attention_heads: Tensor | None = None  # [B, H, N] per-head scores, when the model has heads


@dataclass
class MILOutput:
    """What ``forward`` returns."""

    logits: Tensor  # [B, C] (== embedding [B, E] when the head is nn.Identity)
    embedding: Tensor  # [B, E]
    attention: Tensor  # [B, N]
    aux: dict[str, Tensor] = field(default_factory=dict)
    attention_heads: Tensor | None = None  # [B, H, N]


def bag_center(x: Tensor, mask: Tensor) -> Tensor:
    """``x [B, N, D]`` minus each bag's mean over its real instances (``mask [B, N]``); padding stays 0."""
    m = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
    mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)  # [B, 1, D]
    return (x - mean) * m


InputNorm = Literal["none", "bag_center"]  # the keys of INPUT_NORMS (tests check they agree)
#: name -> transform of a batch of bags ``(x [B, N, D], mask [B, N]) -> x'`` applied before the network
INPUT_NORMS: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {"none": None, "bag_center": bag_center}


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class MILAggregator(nn.Module):
    """Base class of every MIL aggregator.

    Subclasses call ``super().__init__(in_dim, num_classes, embed_dim)`` and implement
    :meth:`_forward_features` (which always receives a full bool mask). The head is ``self.head``:
    ``nn.Linear(embed_dim, num_classes)`` or ``nn.Identity`` when ``num_classes == 0``.
    """

    check_values: bool = True
    input_norm: str = "none"  # a key of INPUT_NORMS; set with set_input_norm

    def __init__(self, in_dim: int, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        if int(in_dim) < 1:
            raise MILConfigError(f"{type(self).__name__}: in_dim must be >= 1, got {in_dim}")
        if int(num_classes) < 0:
            raise MILConfigError(f"{type(self).__name__}: num_classes must be >= 0, got {num_classes}")
        self.in_dim = int(in_dim)
        self.embed_dim = int(embed_dim)
        self.num_classes = int(num_classes)
        self.head: nn.Module = self._make_head(self.num_classes)

    # ----------------------------------------------------------------------------------------- head
    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head: ``num_classes == 0`` gives ``nn.Identity`` (logits = embedding)."""
        if int(num_classes) < 0:
            raise MILConfigError(f"reset_classifier: num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        ref = next(self.parameters())
        self.head = self._make_head(self.num_classes).to(device=ref.device, dtype=ref.dtype)

    def forward_head(self, emb: Tensor, pre_logits: bool = False) -> Tensor:
        """``emb [B, E]`` -> logits ``[B, C]`` (or ``emb`` itself when ``pre_logits``)."""
        return emb if pre_logits else self.head(emb)

    def set_input_norm(self, name: str) -> None:
        """Choose the transform :meth:`forward_features` applies to each bag first (a key of :data:`INPUT_NORMS`)."""
        if name not in INPUT_NORMS:
            raise MILConfigError(f"{type(self).__name__}: input_norm must be one of {sorted(INPUT_NORMS)}, got {name!r}")
        self.input_norm = name

    # -------------------------------------------------------------------------------------- checks
    def check_input(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Validate a batch of bags and return the bool mask ``[B, N]`` (all True when ``mask`` is None).

        Raises :class:`MILInputError` (a ``ValueError``) naming the problem.
        """
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise MILInputError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3:
            raise MILInputError(f"{name}: x must be [B, N, D] (3 dims), got shape {tuple(x.shape)}")
        b, n, d = x.shape
        if d != self.in_dim:
            raise MILInputError(f"{name}: feature dim mismatch, expected in_dim={self.in_dim}, got {d}")
        if b == 0:
            raise MILInputError(f"{name}: empty batch (B=0)")
        if n == 0:
            raise MILInputError(f"{name}: empty bag (N=0 instances)")
        if not x.is_floating_point():
            raise MILInputError(f"{name}: x must be floating point, got {x.dtype}")
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        else:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise MILInputError(f"{name}: mask must be a bool tensor, got {getattr(mask, 'dtype', mask)}")
            if tuple(mask.shape) != (b, n):
                raise MILInputError(f"{name}: mask shape {tuple(mask.shape)} does not match x [B, N] = {(b, n)}")
        if self.check_values and not _is_compiling():
            if not bool(mask.any(dim=1).all()):
                bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
                raise MILInputError(f"{name}: bag(s) {bad} have an all-False mask (no real instance)")
            if not bool(torch.isfinite(x).all()):
                raise MILInputError(f"{name}: x contains NaN or inf features")
        return mask

    # ------------------------------------------------------------------------------------- forward
    def _forward_features(self, x: Tensor, mask: Tensor) -> BagFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> BagFeatures:
        """``x [B, N, D_in]``, ``mask [B, N]`` bool|None -> :class:`BagFeatures`.

        Features in another floating dtype than the model's (e.g. float16 as stored in bags) are cast to it
        unless autocast is active. With ``check_values`` a non-finite embedding from finite features (values
        too large for the arithmetic) raises :class:`MILInputError` instead of giving NaN logits.
        """
        mask = self.check_input(x, mask)
        ref = next(self.parameters(), None)
        if ref is not None and x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(ref.dtype)
        norm = INPUT_NORMS[self.input_norm]
        feats = self._forward_features(x if norm is None else norm(x, mask), mask)
        self._check_output(x, feats.embedding, "slide embedding")
        return feats

    def _check_output(self, x: Tensor, out: Tensor, what: str) -> None:
        """With ``check_values``: raise :class:`MILInputError` when ``out`` is not finite although ``x`` is.

        Skipped under float16 autocast, where a transient overflow is the gradient scaler's to handle.
        """
        if not self.check_values or _is_compiling():
            return
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16:
            return
        if bool(torch.isfinite(out).all()):
            return
        name = type(self).__name__
        bad = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise MILInputError(f"{name}: the {what} is not finite: parameters {bad[:3]} are (training diverged?)")
        peak = float(x.detach().abs().amax())
        raise MILInputError(
            f"{name}: the {what} is not finite although the features are (max |x| = {peak:.3g}); "
            f"features this large overflow {x.dtype} arithmetic: rescale them"
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        feats = self.forward_features(x, mask)
        logits = self.forward_head(feats.embedding)  # [B, C]
        self._check_output(x, logits, "logits")
        return MILOutput(logits=logits, embedding=feats.embedding, attention=feats.attention,
                         aux=feats.aux, attention_heads=feats.attention_heads)

    # --------------------------------------------------------------------------------------- hooks
    def on_after_optimizer_step(self) -> None:
        """Called by the trainer after each optimizer step (ASMIL updates its EMA anchor). Default no-op."""

    def set_progress(self, fraction: float) -> None:
        """Called by the trainer with training progress in [0, 1] (AEM's λ schedule). Default no-op."""
