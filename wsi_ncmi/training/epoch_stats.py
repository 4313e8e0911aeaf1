"""What ``MILModule`` accumulates over an epoch for its epoch-level logs.

* :class:`TermSums`: Σ value·B of every named loss term over the training epoch, kept on the device (no host
  sync per step) and turned into epoch means once, with one sum over the DDP ranks.
* :class:`OnlineClassMeans`: per-class sums of p over the epoch's training bags, for ``val/cc_accuracy`` (the
  CC protocol of NCMI.md §3 done online: nearest class mean by KL).
* :func:`gather_eval`: one key of the validation/test step records, gathered from every rank, with the bags
  repeated by the distributed sampler's padding dropped (by :func:`slide_key`).

``sum_fn`` is a sum over the DDP ranks (identity in a single process): ``MILModule._sum_over_ranks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from wsi_ncmi.ncmi import CentroidAccumulator
from wsi_ncmi.ncmi.centroids import kl_rows_to_centroids

__all__ = ["OnlineClassMeans", "TermSums", "gather_eval", "slide_key"]

SumFn = Callable[[Tensor], Tensor]


class TermSums:
    """Running Σ value·B per loss term of one epoch (see the module docstring)."""

    def __init__(self) -> None:
        self._state: tuple[list[str], Tensor, int] | None = None  # (term names, Σ value·B [K], Σ B)

    def reset(self) -> None:
        self._state = None

    def add(self, named: dict[str, Tensor], batch_size: int) -> None:
        """Sum every loss term × batch size on the device (no host sync)."""
        values = torch.stack([v.detach().float() for v in named.values()]) * batch_size  # [K]
        if self._state is None or self._state[0] != list(named):
            self._state = (list(named), torch.zeros_like(values), 0)
        keys, sums, count = self._state
        self._state = (keys, sums + values, count + batch_size)

    def pop_means(self, sum_fn: SumFn) -> list[tuple[str, float]]:
        """``[(term, epoch mean over every rank)]`` and reset; ``[]`` (and no collective) when nothing was added."""
        if self._state is None:
            return []
        keys, sums, count = self._state
        self._state = None
        totals = sum_fn(torch.cat([sums, sums.new_tensor([float(count)])]))  # [K + 1]
        means = totals[:-1] / totals[-1].clamp_min(1.0)
        return list(zip(keys, means.tolist(), strict=True))


class OnlineClassMeans:
    """Class means of p over the epoch's training bags (as the model was when each bag went through)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self._sums: CentroidAccumulator | None = None

    def reset(self) -> None:
        self._sums = None

    @torch.no_grad()
    def update(self, log_p: Tensor, target: Tensor) -> None:
        """Add p [B, D] (from the loss's ln p of this batch) to the per-class sums of the epoch."""
        if self._sums is None:
            self._sums = CentroidAccumulator(self.num_classes, log_p.shape[1])
        # float64 sums and centroids; the loss already saw these labels (no per-step host sync here)
        self._sums.update(log_p.detach().double().exp(), target, check_labels=False)

    def accuracy(self, p: Tensor, labels: Tensor, sum_fn: SumFn | None = None) -> float | None:
        """Accuracy of the nearest (KL) class mean for p [N, D]; None before any training bag this epoch."""
        if self._sums is None:
            return None
        centroids = self._sums.compute(allow_empty=True, sum_fn=sum_fn)  # [C, D]; NaN rows: no bag this epoch
        kl = kl_rows_to_centroids(p.double().to(centroids.device), centroids)  # [N, C], inf for NaN rows
        return float((kl.argmin(1) == labels.to(kl.device)).double().mean())


def slide_key(slide_id: str) -> int:
    """A stable signed 64-bit key of a slide id (de-duplicates bags gathered from several ranks)."""
    return int.from_bytes(hashlib.blake2b(str(slide_id).encode(), digest_size=8).digest(), "big", signed=True)


def gather_eval(
    records: list[dict[str, Tensor]], key: str, world_size: int, all_gather: Callable[[Tensor], Tensor]
) -> Tensor:
    """``key`` of every evaluated bag, gathered from all ranks; bags repeated by the sampler's padding dropped
    (records carry ``"sid"`` = :func:`slide_key` [B] for that)."""
    local = torch.cat([r[key] for r in records])
    if world_size > 1:
        local = all_gather(local).flatten(0, 1)
        if all("sid" in r for r in records):
            sid = all_gather(torch.cat([r["sid"] for r in records])).flatten(0, 1)
            _, first = np.unique(sid.cpu().numpy(), return_index=True)
            local = local[torch.as_tensor(np.sort(first), device=local.device)]
    return local
