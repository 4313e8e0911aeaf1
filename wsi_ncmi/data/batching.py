"""How bags become batches: the padding collate with a mask, and the epoch-seeded weighted sampler.

Both take what :class:`~wsi_ncmi.data.mil.MILDataModule` hands them (dataset items, class weights), never user
input, so a bad argument is a ``ValueError`` (a programming error), not a user error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochWeightedSampler", "collate_bags"]


class EpochWeightedSampler(Sampler[int]):
    """Draw ``num_samples`` indices with replacement, with probability proportional to ``weights``.

    The order is a pure function of ``(seed, epoch)``: ``set_epoch`` (called by Lightning and by
    ``MILModule`` at every training epoch start) reseeds it, so a run resumed from a checkpoint draws the
    same bags as an uninterrupted one.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_samples: int, seed: int = 0,
                 epoch: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)  # [N]
        if self.weights.ndim != 1 or len(self.weights) == 0 or bool((self.weights < 0).any()):
            raise ValueError(f"EpochWeightedSampler: weights must be a non-empty 1-d tensor >= 0, "
                             f"got shape {tuple(self.weights.shape)}")
        if num_samples < 1:
            raise ValueError(f"EpochWeightedSampler: num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        # one seed from (seed, epoch): hash both through numpy's SeedSequence, avoiding seed + epoch collisions
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(seed)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=gen).tolist()


def collate_bags(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack bags of different sizes: zero-pad to the longest, ``mask`` True on real instances.

    Returns ``features`` [B, N, D] (the items' dtype; float32 if they differ), ``mask`` [B, N] bool, ``label`` [B] long, ``slide_id`` list
    and, when the items have them, ``coords`` [B, N, 2] int64 (padding = -1).
    """
    if not items:
        raise ValueError("collate_bags: empty batch")
    dims = {int(it["features"].shape[-1]) for it in items}
    if len(dims) > 1:
        ids = [it.get("slide_id") for it in items]
        raise ValueError(f"collate_bags: bags {ids} have different feature dims {sorted(dims)}")
    sizes = [int(it["features"].shape[0]) for it in items]
    b, n, d = len(items), max(sizes), dims.pop()
    out: dict[str, Any] = {
        "label": torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long),  # [B]
        "slide_id": [str(it["slide_id"]) for it in items],
    }
    if b == 1:
        out["features"] = items[0]["features"].unsqueeze(0)  # [1, N, D]
        out["mask"] = torch.ones(1, n, dtype=torch.bool, device=out["features"].device)  # [1, N]
    else:
        dtypes = {it["features"].dtype for it in items}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        device = items[0]["features"].device  # cached bags may already live on the accelerator
        feats = torch.zeros(b, n, d, dtype=dtype, device=device)  # [B, N, D]
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)  # [B, N]
        for i, it in enumerate(items):
            feats[i, : sizes[i]] = it["features"]
            mask[i, : sizes[i]] = True
        out["features"], out["mask"] = feats, mask
    if all("coords" in it for it in items):
        coords = torch.full((b, n, 2), -1, dtype=torch.long)  # [B, N, 2]
        for i, it in enumerate(items):
            coords[i, : sizes[i]] = torch.as_tensor(it["coords"], dtype=torch.long)
        out["coords"] = coords
    return out
