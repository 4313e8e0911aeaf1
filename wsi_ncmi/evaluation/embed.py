"""Run a frozen MIL aggregator over a split and keep what every evaluation protocol needs.

For each slide: the raw slide embedding f(x) [E], the head logits [C] (when the aggregator has a head),
and, for NCMI runs, the log of the point on the simplex ln p [D] and the centred, L2-normalised feature
(the LP input, NCMI.md §3).

LP input ("normalized"):

* NCMI runs: ``ncmi_loss.normalized(f)``, i.e. ``(f − c) / ‖f − c‖`` with c the loss's EMA center
  (frozen; it is the center the model was trained with).
* CE / head runs have no such center: the embeddings are centred on the **training-split** mean
  embedding and L2-normalised. :func:`embed_splits` does this (train is embedded first);
  :func:`embed_split` does it when given ``center``.

The model and loss are put in eval mode and run under ``torch.no_grad()``; their previous mode is
restored afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_ncmi.errors import UserError
from wsi_ncmi.models import MILAggregator
from wsi_ncmi.ncmi import NCMILoss

__all__ = ["EmbedError", "EmbeddedSplit", "embed_split", "embed_splits", "center_and_normalize"]

logger = logging.getLogger(__name__)


class EmbedError(UserError):
    """A split could not be embedded (empty loader, batch without the expected keys, ...)."""


@dataclass
class EmbeddedSplit:
    """Per-slide outputs of a frozen aggregator on one split (rows in loader order)."""

    slide_ids: list[str]
    labels: np.ndarray  # [N] int64
    embeddings: np.ndarray  # [N, E] raw slide embeddings f(x)
    logits: np.ndarray | None = None  # [N, C] head logits (aggregators with a head)
    log_probs: np.ndarray | None = None  # [N, E] ln p on the NCMI simplex (NCMI runs)
    normalized: np.ndarray | None = None  # [N, E] centred, L2-normalised embeddings (the LP input)
    input_means: np.ndarray | None = None  # [N, D] each bag's mean instance feature (padding excluded; OOD input_z)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def probs(self) -> np.ndarray | None:
        """Points on the NCMI simplex exp(ln p) [N, E], or None for runs without an NCMI loss."""
        return None if self.log_probs is None else np.exp(self.log_probs)


def center_and_normalize(embeddings: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(f − center) / ‖f − center‖₂ row-wise -> [N, E] (a zero row stays zero)."""
    z = np.asarray(embeddings, dtype=np.float64) - np.asarray(center, dtype=np.float64)[None, :]
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norm, 1e-12)


def _has_head(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return head is not None and not isinstance(head, nn.Identity)


def _batch_parts(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[str]]:
    if not isinstance(batch, Mapping) or "features" not in batch or "label" not in batch:
        raise EmbedError(
            f"embed_split: batch {index} must be a dict with 'features', 'mask', 'label', 'slide_id'; "
            f"got {type(batch).__name__} with keys {list(batch) if isinstance(batch, Mapping) else '-'}"
        )
    x = batch["features"]  # [B, N, D] stored dtype (float16 or float32); cast on the device by embed_split
    mask = batch.get("mask")  # [B, N] bool or None
    y = torch.as_tensor(batch["label"]).reshape(-1)  # [B]
    ids = batch.get("slide_id")
    if ids is None:
        ids = [f"batch{index}_{i}" for i in range(x.shape[0])]
    elif isinstance(ids, str):
        ids = [ids]
    return x, mask, y, [str(s) for s in ids]


@torch.no_grad()
def embed_split(
    model: MILAggregator,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    ncmi_loss: NCMILoss | None = None,
    center: np.ndarray | None = None,
    with_head: bool | None = None,
    progress: bool = False,
) -> EmbeddedSplit:
    """Embed every bag of ``loader`` with the frozen ``model`` (module docstring).

    ``with_head`` (default: the model has a non-Identity head) adds ``logits``. ``center`` [E] is used
    for ``normalized`` when there is no ``ncmi_loss``; without either, ``normalized`` stays None.
    """
    device = torch.device(device)
    with_head = _has_head(model) if with_head is None else with_head
    was_training = model.training
    loss_training = ncmi_loss.training if ncmi_loss is not None else False
    model.eval().to(device)
    if ncmi_loss is not None:
        ncmi_loss.eval().to(device)
    ids: list[str] = []
    labels, embs, logits, log_probs, normed, in_means = [], [], [], [], [], []
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="embed", leave=False)
    try:
        for i, batch in enumerate(iterator):
            x, mask, y, batch_ids = _batch_parts(batch, i)
            x = x.to(device, non_blocking=True).float()  # [B, N, D]
            mask = None if mask is None else mask.to(device, non_blocking=True)
            feats = model.forward_features(x, mask)
            keep = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()  # [B, N]
            in_means.append(((x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)).cpu())  # [B, D]
            emb = feats.embedding.float()  # [B, E]
            embs.append(emb.cpu())
            labels.append(y.cpu().long())
            ids += batch_ids
            if with_head:
                logits.append(model.forward_head(feats.embedding).float().cpu())  # [B, C]
            if ncmi_loss is not None:
                log_probs.append(ncmi_loss.log_probs(emb).float().cpu())  # [B, E]
                normed.append(ncmi_loss.normalized(emb).float().cpu())  # [B, E]
    finally:
        model.train(was_training)
        if ncmi_loss is not None:
            ncmi_loss.train(loss_training)
    if not embs:
        raise EmbedError("embed_split: the loader yielded no batch")
    out = EmbeddedSplit(
        slide_ids=ids,
        labels=torch.cat(labels).numpy().astype(np.int64),
        embeddings=torch.cat(embs).numpy(),
        logits=torch.cat(logits).numpy() if logits else None,
        log_probs=torch.cat(log_probs).numpy() if log_probs else None,
        normalized=torch.cat(normed).numpy() if normed else None,
        input_means=torch.cat(in_means).double().numpy(),
    )
    if out.normalized is None and center is not None:
        out.normalized = center_and_normalize(out.embeddings, center)
    logger.info("embedded %d slides (embedding dim %d)", len(out), out.embeddings.shape[1])
    return out


def embed_splits(
    model: MILAggregator,
    loaders: Mapping[str, Iterable[Any]],
    device: str | torch.device = "cpu",
    ncmi_loss: NCMILoss | None = None,
    with_head: bool | None = None,
    progress: bool = False,
) -> dict[str, EmbeddedSplit]:
    """Embed several splits; without an NCMI loss the LP input is centred on the ``"train"`` mean.

    ``loaders`` maps split name -> loader and must contain ``"train"``.
    """
    if "train" not in loaders:
        raise EmbedError(f"embed_splits: a 'train' loader is required, got splits {list(loaders)}")
    kw = dict(device=device, ncmi_loss=ncmi_loss, with_head=with_head, progress=progress)
    out = {"train": embed_split(model, loaders["train"], **kw)}
    center = None
    if ncmi_loss is None:
        center = out["train"].embeddings.astype(np.float64).mean(axis=0)  # [E]
        out["train"].normalized = center_and_normalize(out["train"].embeddings, center)
    for name, loader in loaders.items():
        if name != "train":
            out[name] = embed_split(model, loader, center=center, **kw)
    return out
