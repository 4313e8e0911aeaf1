"""The linear probe of the natural-image track (LP protocol) and the row store that feeds it.

* :class:`LinearProbeConfig` / :func:`fit_linear_probe`: a torch ``nn.Linear(D, C)`` trained with CE on
  frozen features (SGD + momentum, cosine lr; a fixed recipe, features are unit-norm).
* :func:`center_normalize_`: the LP input of non-NCMI runs, ``normalize(x - mean)`` in place, chunk by chunk.
* :class:`RowStore`: one preallocated CPU buffer for the [N_train, D] LP input (the only per-sample data
  :func:`wsi_ncmi.natural.evaluate.evaluate_image_model` keeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearProbeConfig", "RowStore", "center_normalize_", "fit_linear_probe"]

_CHUNK_ROWS = 65536  # rows per chunk when centring / normalising the stored LP input in place


class RowStore:
    """Preallocated [N, ...] CPU buffer filled batch by batch (grows ×1.5 when the size hint was short).

    One allocation instead of a list of per-batch tensors: small per-batch tensors kept alive between the
    freed batch temporaries fragment the heap (measured: ~2× the stored bytes of extra resident memory).
    """

    def __init__(self, dtype: torch.dtype, capacity: int = 0) -> None:
        self.dtype = dtype
        self.capacity = int(capacity)
        self.buf: Tensor | None = None  # [capacity, ...] on the CPU
        self.n = 0

    def append(self, rows: Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype)  # [B, ...]
        need = self.n + rows.shape[0]
        if self.buf is None:
            self.buf = torch.empty(max(self.capacity, need), *rows.shape[1:], dtype=self.dtype)
        elif need > self.buf.shape[0]:
            grown = torch.empty(max(need, int(self.buf.shape[0] * 1.5) + 1), *rows.shape[1:], dtype=self.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = rows
        self.n = need

    def tensor(self) -> Tensor:
        if self.buf is None:
            raise ValueError("no row was stored")
        return self.buf[: self.n]  # a view: no copy


@dataclass
class LinearProbeConfig:
    """Recipe of the torch linear probe (fixed; features are unit-norm so a large lr is used)."""

    epochs: int = 100
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0


def fit_linear_probe(
    x: Tensor, y: Tensor, num_classes: int, config: LinearProbeConfig | None = None, device: str | torch.device = "cpu"
) -> nn.Linear:
    """Train ``nn.Linear(D, C)`` with CE on fixed features ``x`` [N, D] (SGD + momentum, cosine lr).

    ``x`` may be float16 (each mini-batch is cast to float32); it is moved to ``device`` once.
    """
    cfg = config or LinearProbeConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        layer = nn.Linear(x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(x.shape[0] / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    x, y = x.to(device), y.to(device).long()
    layer.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for i in range(0, x.shape[0], cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(layer(x[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    layer.eval()
    return layer


def center_normalize_(x: Tensor, mean: Tensor) -> None:
    """In place, chunk by chunk: ``x <- normalize(x - mean)`` for x [N, D] (any float dtype), mean [D]."""
    mean = mean.to(torch.float32)
    for i in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[i : i + _CHUNK_ROWS]
        chunk.copy_(F.normalize(chunk.float() - mean, dim=1))
