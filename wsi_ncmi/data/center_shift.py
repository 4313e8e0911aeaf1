"""Centre-shift augmentation of bag features, for training only.

Slides from one hospital share a stain and a scanner, and through the encoder that shows as a shift shared by every
tile of a slide. On a cohort whose test centres are unseen (CAMELYON-17's official split), a network can learn the
training centres' shifts together with the labels and then misread a new centre.

This module estimates the training centres' shifts and adds a random mix of them to each training bag:

* ``μ_k`` is centre ``k``'s *label-balanced* mean tile feature: the mean over the labels present at ``k`` of the
  mean bag-mean feature of ``k``'s training bags with that label. Balancing over labels matters because the
  centres' label shares differ, so a plain centre mean would also carry tumour.
* ``Δ_k = μ_k − mean_k μ_k`` gives one direction per training centre, ``[K, D]``.
* Each training bag gets ``h = scale · Σ_k a_k Δ_k`` with ``a_k ~ N(0, 1)``, added to every tile. There is one
  draw per bag and epoch, a pure function of ``(seed, epoch, index)``.

Validation, test, evaluation and prediction never see it. A split table without a ``center`` column, or with fewer
than two training centres, turns it off with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["CenterShift", "centre_directions", "fit_center_shift"]


def centre_directions(bag_means: np.ndarray, centres: Sequence[int], labels: Sequence[int]) -> np.ndarray | None:
    """``[K, D]`` rows ``μ_k − mean_k μ_k`` over the ``K`` centres of ``centres`` (label-balanced centre means of
    ``bag_means [M, D]``; see the module docstring), or None with fewer than two centres."""
    centres, labels = np.asarray(centres), np.asarray(labels)
    keys = sorted(set(centres.tolist()))
    if len(keys) < 2:
        return None
    mus = []
    for k in keys:
        at_k = centres == k
        per_label = [bag_means[at_k & (labels == y)].mean(0) for y in sorted(set(labels[at_k].tolist()))]
        mus.append(np.mean(per_label, axis=0))  # [D]
    mu = np.stack(mus).astype(np.float32)  # [K, D]
    return mu - mu.mean(0, keepdims=True)


class CenterShift:
    """Draws one bag-wide shift ``[D]`` = ``scale · a @ directions`` with ``a ~ N(0, I_K)``."""

    def __init__(self, directions: np.ndarray, scale: float) -> None:
        self.directions = torch.as_tensor(directions, dtype=torch.float32)  # [K, D]
        self.scale = float(scale)

    def draw(self, rng: np.random.Generator) -> Tensor:
        a = torch.as_tensor(rng.standard_normal(self.directions.shape[0]), dtype=torch.float32)  # [K]
        return self.scale * (a @ self.directions)  # [D]

    def apply(self, feats: Tensor, rng: np.random.Generator) -> Tensor:
        """``feats [N, D]`` plus one drawn shift, in their own dtype and device."""
        return feats + self.draw(rng).to(device=feats.device, dtype=feats.dtype)


def fit_center_shift(features: Callable[[int], Tensor], table: pd.DataFrame, scale: float,
                     where: str) -> CenterShift | None:
    """The augmentation of a training split: row ``i`` of ``table`` (``label`` and, when present, ``center``)
    is bag ``i``, whose ``[N, D]`` features ``features(i)`` returns. Returns None, after one log line saying why,
    when it cannot apply."""
    col = table["center"] if "center" in table.columns else None
    centres = col.astype(int).tolist() if col is not None and bool(col.notna().all()) else None
    labels = table["label"].astype(int).tolist()
    if centres is None:
        log.warning("%s: center_shift=%g needs a 'center' value for every training slide of the split table; "
                    "it has none (or some are empty), so the augmentation is off", where, scale)
        return None
    if len(set(centres)) < 2:
        log.warning("%s: center_shift=%g needs two or more training centres, found %s; the augmentation is off",
                    where, scale, sorted(set(centres)))
        return None
    means = np.stack([features(i).float().mean(0).cpu().numpy() for i in range(len(labels))])  # [M, D]
    directions = centre_directions(means, centres, labels)
    assert directions is not None
    norms = np.linalg.norm(directions, axis=1)
    log.info("%s: center_shift=%g over %d training centres (|Δ_k| %s)", where, scale, len(directions),
             ", ".join(f"{n:.3g}" for n in norms))
    return CenterShift(directions, scale)
