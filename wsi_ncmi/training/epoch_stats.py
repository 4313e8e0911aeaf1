"""What ``MILModule`` accumulates over an epoch for its epoch-level logs (the online CC of NCMI runs is
:mod:`wsi_ncmi.training.ncmi_objective`'s).

* :class:`TermSums`: Σ value·B of every named loss term over the training epoch, kept on the device (no host
  sync per step) and turned into epoch means once, with one sum over the DDP ranks.
* :func:`eval_record`: one validation/test batch's record; :func:`gather_eval`: one key of the records,
  gathered from every rank, with the bags repeated by the distributed sampler's padding dropped (by
  :func:`slide_key`).

``sum_fn`` is a sum over the DDP ranks (identity in a single process): ``MILModule._sum_over_ranks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["TermSums", "eval_record", "gather_eval", "slide_key"]

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


def slide_key(slide_id: str) -> int:
    """A stable signed 64-bit key of a slide id (de-duplicates bags gathered from several ranks)."""
    return int.from_bytes(hashlib.blake2b(str(slide_id).encode(), digest_size=8).digest(), "big", signed=True)


def eval_record(scores: Tensor, label: Tensor, loss: Tensor, slide_ids: Sequence[str] | None = None,
                p: Tensor | None = None) -> dict[str, Tensor]:
    """One evaluated batch, detached: ``scores`` [B, C], ``label`` [B], ``loss`` [B] (the batch's loss repeated),
    ``sid`` [B] (:func:`slide_key` of each slide, when the ids are known) and ``p`` [B, D] (NCMI runs)."""
    rec = {"scores": scores.detach(), "label": label.detach(), "loss": loss.detach().float().expand(scores.shape[0])}
    if slide_ids is not None:
        rec["sid"] = torch.tensor([slide_key(s) for s in slide_ids], dtype=torch.long, device=scores.device)  # [B]
    if p is not None:
        rec["p"] = p.detach()
    return rec


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
