"""How ``MILModule`` moves NCMI's feature center c and centroids ξ outside the loss's own ``forward``.

* :func:`init_from_training_bags`: the warm-up pass before the first training step of a fresh run — c from the
  mean raw embedding of the first ``n_center`` training batches and, with ``class_means``, ξ from the class
  means of the centred, L2-normalised embeddings of the whole training split (one no-grad pass for both).
* :func:`global_mean`: the mean of a batch over every DDP rank (sums and counts all-reduced), which feeds the
  center EMA so that every rank holds the center one process with the global batch would.
* :func:`centroid_sgd_step`: the paper's manual ξ step (Alg. 1, ``centroid_optimizer="sgd"``).

``sum_fn`` is a sum over the DDP ranks (identity in a single process): ``MILModule._sum_over_ranks``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from wsi_ncmi.ncmi import NCMILoss

__all__ = ["centroid_sgd_step", "global_mean", "init_from_training_bags"]

logger = logging.getLogger(__name__)

SumFn = Callable[[Tensor], Tensor]


@torch.no_grad()
def global_mean(f: Tensor, sum_fn: SumFn) -> tuple[Tensor, int]:
    """Mean [D] of ``f`` [B, D] over the rows of every rank (all-reduced sums and counts) and the row count."""
    total = torch.cat([f.detach().float().sum(0), f.new_tensor([f.shape[0]], dtype=torch.float32)])  # [D+1]
    total = sum_fn(total)
    return total[:-1] / total[-1].clamp_min(1.0), int(total[-1])


@torch.no_grad()
def init_from_training_bags(
    loss: NCMILoss,
    loader: Iterable[Any],
    embed_batch: Callable[[Any], tuple[Tensor, Tensor]],
    num_classes: int,
    n_center: int,
    class_means: bool,
    sum_fn: SumFn,
) -> None:
    """One no-grad pass over training batches: c = mean raw embedding of the first ``n_center`` batches; with
    ``class_means`` (the whole split is read) ξ from the class means of the centred, L2-normalised embeddings.

    ``embed_batch(batch) -> (embedding [B, E] float32, labels [B] long)`` runs the model (eval mode, on the
    device); a batch past ``n_center`` is not embedded unless ``class_means``.

    With one bag per batch, initialising c from the first training batch makes z = f − c exactly 0 for that
    bag, whose L2 normalisation then back-propagates a ~1e12 gradient that wrecks Adam's second-moment
    estimate; a mean over several bags avoids it. The EMA then continues as usual (NCMI.md §1).
    """
    embs, labels, center_rows = [], [], 0
    for i, batch in enumerate(loader):
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
        mean, n = global_mean(emb[:center_rows], sum_fn)  # [E], bags on all ranks
        loss.center.update(mean[None])  # first update initialises c = mean
        logger.info("NCMI feature center initialised from %d training bags", n)
    if class_means:
        z = loss.normalized(emb)  # [N, E], with the center just set
        y = torch.cat(labels)
        sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
        counts = torch.bincount(y, minlength=num_classes).to(z.dtype)  # [C]
        total = sum_fn(torch.cat([sums, counts[:, None]], dim=1))  # [C, E + 1]
        counts = total[:, -1]
        loss.init_centroids_from_means(total[:, :-1] / counts.clamp_min(1.0)[:, None], counts > 0)
        logger.info(
            "NCMI centroids ξ initialised from the class means of %d training bags (per class %s)",
            int(counts.sum()),
            counts.long().tolist(),
        )


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
