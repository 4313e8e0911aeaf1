"""Bag features held in memory (host RAM or one accelerator) for the whole run.

A MIL epoch reads every bag once; from disk that is the bottleneck of a small aggregator (a 10,000 × 1024
float16 bag is 20 MB, so 2,000 bags/s would need 40 GB/s). :class:`BagCache` reads the bags of one split
once, keeps them as float16 tensors (a float32 bag whose values do not fit float16 stays float32) and serves
them from memory for the rest of the run.

* Every bag's values are checked once when it is read (NaN / inf, empty bag, feature dim): the error names the
  file, so a corrupt bag is found before the first training step and not mid-epoch.
* Files are never re-read. :meth:`BagCache.changed_on_disk` compares each file's size and mtime with those
  it had when it was cached, so a caller can warn that the run keeps using the cached copy.
* :func:`resolve_cache_mode` turns ``auto`` into ``device`` / ``ram`` / ``none`` from the bag headers and a
  memory budget (a fraction of the currently available memory); an explicit ``ram`` / ``device`` that does not
  fit fails before anything is read, with the needed and available sizes.
"""

from __future__ import annotations

import logging
import os
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from wsi_ncmi.choices import check_choices
from wsi_ncmi.data.bags import BagError, read_features, read_header
from wsi_ncmi.errors import UserError

__all__ = ["CACHE_MODES", "CacheMode", "BagCache", "CacheError", "available_memory", "bags_nbytes", "headers_nbytes",
           "resolve_cache_mode"]

log = logging.getLogger(__name__)

CacheMode = Literal["auto", "none", "ram", "device"]
CACHE_MODES: tuple[str, ...] = typing.get_args(CacheMode)
_FP16_MAX = float(np.finfo(np.float16).max)


class CacheError(UserError):
    """A requested cache cannot be built (does not fit the budget, unknown mode, bad bag)."""


def _cached_itemsize(dtype: np.dtype) -> int:
    return 2 if np.dtype(dtype).itemsize >= 2 else np.dtype(dtype).itemsize


def headers_nbytes(headers: Iterable[tuple[int, int, np.dtype]]) -> int:
    """Bytes the cache needs for bags with these headers ``(N, D, dtype)`` (float16 features)."""
    return sum(n * d * _cached_itemsize(dtype) for n, d, dtype in headers)


def bags_nbytes(paths: Sequence[str | os.PathLike]) -> int:
    """Bytes the cache needs for these bags (float16 features), from their headers only."""
    return headers_nbytes(read_header(p) for p in paths)


def available_memory(device: torch.device) -> int:
    """Bytes currently available on ``device``: free accelerator memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux hosts
        pass
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")  # pragma: no cover
    return int(pages * size)  # pragma: no cover


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def resolve_cache_mode(mode: CacheMode, needed: int, device: torch.device, budget: float, where: str) -> str:
    """``none`` / ``ram`` / ``device`` for a split needing ``needed`` bytes.

    ``budget`` is the fraction of the available memory the cache may take. ``auto`` picks ``device`` when
    ``device`` is an accelerator and the bags fit its budget, else ``ram`` when they fit the host's, else
    ``none``. An explicit ``ram`` / ``device`` that does not fit raises :class:`CacheError`.
    """
    check_choices(resolve_cache_mode, {"mode": mode}, where, CacheError)
    if not 0.0 < budget <= 1.0:
        raise CacheError(f"{where}: cache_budget must be in (0, 1], got {budget}")
    if mode == "none":
        return "none"
    host = torch.device("cpu")
    if mode == "device" and device.type == "cpu":
        mode = "ram"  # on a CPU-only run the host memory is the device memory
    if mode == "auto":
        if device.type != "cpu" and needed <= budget * available_memory(device):
            return "device"
        return "ram" if needed <= budget * available_memory(host) else "none"
    target = device if mode == "device" else host
    allowed = int(budget * available_memory(target))
    if needed > allowed:
        raise CacheError(
            f"{where}: cache={mode} needs {_gib(needed)} for the bags but the budget is {_gib(allowed)} "
            f"({budget:.0%} of the {_gib(available_memory(target))} available on {target}); use cache=none "
            "(read from disk), a larger cache_budget, or fewer bags"
        )
    return mode


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _checked(path: Path, arr: np.ndarray, in_dim: int | None) -> np.ndarray:
    """The bag's features as the cache stores them, after a one-time check of the shape (``read_features``
    has checked the values)."""
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise BagError(f"{path}: features have shape {arr.shape}, expected [N>0, D]")
    if in_dim is not None and arr.shape[1] != in_dim:
        raise BagError(f"{path}: features have D={arr.shape[1]}, the other bags have D={in_dim}")
    if arr.dtype == np.float16:
        return arr
    if float(np.abs(arr).max()) <= _FP16_MAX:
        return arr.astype(np.float16)
    log.info("%s: values exceed the float16 range; cached as %s", path, arr.dtype)
    return arr


class BagCache:
    """The features of ``paths`` read once into memory (float16 tensors, on ``device``).

    ``cache[i]`` -> features [N_i, D] of bag ``i``. ``nbytes`` is the memory held. ``in_dim`` (optional)
    is checked for every bag.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                 in_dim: int | None = None, progress: bool = True, desc: str = "caching bags") -> None:
        self.paths = [Path(p) for p in paths]
        self.device = torch.device(device)
        self._signatures: list[tuple[int, int]] = []
        self._features: list[Tensor] = []
        iterator: Sequence[Path] = self.paths
        if progress and self.paths:
            from tqdm.auto import tqdm

            # disable=None: a bar on a terminal, nothing in logs / pipes (the size is logged either way)
            iterator = tqdm(self.paths, desc=desc, unit="bag", leave=False, disable=None)
        for path in iterator:
            signature = _signature(path)
            arr = _checked(path, read_features(path, check_values=True), in_dim)
            self._features.append(torch.from_numpy(arr).to(self.device))  # [N, D]
            self._signatures.append(signature)
        self.nbytes = sum(t.numel() * t.element_size() for t in self._features)
        self._warned: set[int] = set()
        log.info("cached %d bags (%s) on %s", len(self.paths), _gib(self.nbytes), self.device)

    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, index: int) -> Tensor:
        return self._features[index]

    def changed_on_disk(self) -> list[Path]:
        """Bags whose file changed (size or mtime) or vanished since caching; each is logged once.

        The cache keeps serving what it read: a run never mixes two versions of a bag.
        """
        changed = []
        for i, (path, sig) in enumerate(zip(self.paths, self._signatures)):
            try:
                now = _signature(path)
            except OSError:
                now = (-1, -1)
            if now != sig:
                changed.append(path)
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("%s changed on disk after it was cached; this run keeps using the cached copy "
                                "(restart the run to use the new file)", path)
        return changed
