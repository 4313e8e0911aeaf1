"""MIL data: a dataset of bags named by a split table and the Lightning datamodule that serves it.

The path from one split table's bags to batches: :class:`BagDataset` and :class:`MILDataModule`, which wires it to
the padding collate and the epoch-seeded sampler of :mod:`wsi_ncmi.data.batching` (re-exported here). Resolving
the split against the bags folder is :mod:`wsi_ncmi.data.split_check`; the in-memory cache is
:mod:`wsi_ncmi.data.cache`; the centre-shift augmentation is :mod:`wsi_ncmi.data.center_shift`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from wsi_ncmi.choices import check_choices
from wsi_ncmi.data.bags import BagError, read_bag, read_features
from wsi_ncmi.data.batching import EpochWeightedSampler, collate_bags
from wsi_ncmi.data.cache import BagCache, CacheError, CacheMode, headers_nbytes, resolve_cache_mode
from wsi_ncmi.data.center_shift import CenterShift, fit_center_shift
from wsi_ncmi.data.split_check import SplitBags, locate_bags, missing_bags_message, split_bags_for
from wsi_ncmi.data.splits import SPLITS, Split, load_split, select_fold
from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)


class MILDataError(UserError):
    """The split table and the bags folder do not make a usable dataset; the message names the split CSV."""


def _apply_label_map(table: pd.DataFrame, label_map: Mapping[Any, int] | None, where: str) -> pd.DataFrame:
    """Remap labels: keys are matched against ``label_name`` (when present) and then the integer label."""
    if not label_map:
        return table
    mapping = {str(k): int(v) for k, v in label_map.items()}
    names = table["label_name"].astype(str) if "label_name" in table.columns else None
    new = []
    for i in range(len(table)):
        key = names.iat[i] if names is not None and names.iat[i] in mapping else str(table["label"].iat[i])
        if key not in mapping:
            raise MILDataError(f"{where}: label {key!r} of slide {table['slide_id'].iat[i]!r} is not in label_map")
        new.append(mapping[key])
    out = table.copy()
    out["label"] = np.asarray(new, dtype=np.int64)
    if names is not None:
        # label_name now refers to the new classes only if it was a 1:1 map; otherwise drop it
        if out.groupby("label")["label_name"].nunique().max() > 1:
            out = out.drop(columns="label_name")
    return out


class BagDataset(Dataset):
    """The slides of one split of a split table, each read from ``<bags_dir>/<slide_id>.h5`` on access.

    Item: ``{"features": [N, D] in the bag's stored dtype (float16 or float32), "label": int, "slide_id": str
    [, "coords": int64 [N, 2]]}``. Features stay float16 until they reach the device (half the bytes through
    DataLoader workers); ``MILModule`` and ``embed_split`` cast them to float32 there.
    In training (``train``, default: ``split == "train"``) ``max_instances`` keeps a random subset of a
    larger bag and ``instance_dropout`` drops each instance with that probability (at least one is kept).
    Both draws are a pure function of ``(seed, epoch, index)`` (``set_epoch``), so they do not depend on the
    number of DataLoader workers, on earlier reads, or on whether the run was resumed from a checkpoint.
    ``cache=True`` reads every bag of the split once into a :class:`~wsi_ncmi.data.cache.BagCache` (float16,
    values checked once, file named on error) and serves items from memory; :meth:`use_cache` attaches a cache
    built elsewhere (e.g. on an accelerator). Cached items are tensors on the cache's device.
    """

    def __init__(
        self,
        split_csv: str | os.PathLike | pd.DataFrame,
        bags_dir: str | os.PathLike,
        split: Split | Literal["all"] = "train",
        label_map: Mapping[Any, int] | None = None,
        max_instances: int | None = None,
        instance_dropout: float = 0.0,
        return_coords: bool = False,
        cache: bool = False,
        seed: int = 0,
        fold: int | None = None,
        train: bool | None = None,
        bag_paths: Mapping[str, Path] | None = None,
    ) -> None:
        where = "split table" if isinstance(split_csv, pd.DataFrame) else str(split_csv)
        check_choices(BagDataset, locals(), where, MILDataError)
        if max_instances is not None and max_instances < 1:
            raise MILDataError(f"max_instances must be >= 1, got {max_instances}")
        if not 0.0 <= instance_dropout < 1.0:
            raise MILDataError(f"instance_dropout must be in [0, 1), got {instance_dropout}")
        table = split_csv if isinstance(split_csv, pd.DataFrame) else load_split(split_csv)
        table = _apply_label_map(select_fold(table, fold, where), label_map, where)
        if split != "all":
            table = table[table["split"] == split]
        self.table = table.reset_index(drop=True)
        self.where = where
        self.split = split
        self.bags_dir = Path(bags_dir)
        if bag_paths is None:
            bags, missing = locate_bags(self.table["slide_id"], self.bags_dir)
        else:
            bags = bag_paths
            missing = [s for s in self.table["slide_id"] if s not in bags]
        if missing:
            raise MILDataError(missing_bags_message(missing, len(self.table), f"{where} (split {split!r})", bags_dir))
        self.paths = [bags[s] for s in self.table["slide_id"]]
        self.labels = self.table["label"].astype(int).tolist()
        self.slide_ids = self.table["slide_id"].tolist()
        self.max_instances = max_instances
        self.instance_dropout = float(instance_dropout)
        self.return_coords = return_coords
        self.cache = cache
        self.seed = seed
        self.train = (split == "train") if train is None else train
        self.epoch = 0
        self.features_cache: BagCache | None = None
        #: training-time centre-shift augmentation (:mod:`wsi_ncmi.data.center_shift`), set by the datamodule
        self.center_shift: CenterShift | None = None
        if cache:
            self.use_cache(BagCache(self.paths, desc=f"caching {split} bags"))

    def use_cache(self, cache: BagCache) -> None:
        """Serve features from ``cache`` (built over exactly ``self.paths``, in order) from now on."""
        if [str(p) for p in cache.paths] != [str(p) for p in self.paths]:
            raise MILDataError(f"{self.where}: the cache holds other bags than split {self.split!r}")
        self.features_cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Training draws (subset, dropout) of every item follow ``(seed, epoch, index)``."""
        if epoch < 0:
            raise MILDataError(f"{self.where}: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), self.epoch, int(index)])

    def _features(self, index: int) -> Tensor:
        if self.features_cache is not None:
            return self.features_cache[index]  # [N, D] float16, on the cache's device
        return torch.from_numpy(read_features(self.paths[index]))  # [N, D] stored dtype

    def _subset(self, index: int, n: int) -> np.ndarray | None:
        """Row indices to keep in training, or None for all."""
        if not self.train or (self.max_instances is None and self.instance_dropout == 0.0):
            return None
        rng = self._rng(index)
        keep = np.arange(n)
        if self.instance_dropout > 0.0:
            kept = keep[rng.random(n) >= self.instance_dropout]
            keep = kept if len(kept) else keep[rng.integers(n, size=1)]
        if self.max_instances is not None and len(keep) > self.max_instances:
            keep = np.sort(rng.choice(keep, size=self.max_instances, replace=False))
        return keep

    def __getitem__(self, index: int) -> dict[str, Any]:
        feats = self._features(index)
        if feats.ndim != 2 or feats.shape[0] == 0:
            raise BagError(f"{self.paths[index]}: features have shape {feats.shape}, expected [N>0, D]")
        keep = self._subset(index, feats.shape[0])
        if keep is not None:
            feats = feats[torch.as_tensor(keep, device=feats.device)]
        if self.train and self.center_shift is not None:  # its own stream: the subset draws stay as they were
            feats = self.center_shift.apply(feats, np.random.default_rng([int(self.seed), self.epoch, int(index), 1]))
        item: dict[str, Any] = {
            "features": feats,  # [N', D] stored dtype
            "label": self.labels[index],
            "slide_id": self.slide_ids[index],
        }
        if self.return_coords:
            coords = read_bag(self.paths[index], lazy=True).coords  # [N, 2]
            item["coords"] = torch.from_numpy(coords if keep is None else coords[keep])
        return item


class MILDataModule(L.LightningDataModule):
    """Bags of one split table as train/val/test dataloaders.

    ``in_dim``, ``num_classes`` and ``class_names`` are known right after construction (one bag header is
    read). Missing bags, empty splits and mixed feature dims raise ``MILDataError`` naming the split CSV,
    before any training step.

    Args:
        bags_dir: folder of ``<slide_id>.h5`` bags.
        split_csv: split table (``slide_id, patient_id, label, split[, fold, label_name]``).
        batch_size: bags per batch (>1 pads and masks).
        num_workers: DataLoader worker processes; None (default) = automatic: 0 when the bags are cached
            (workers would only copy memory), else min(4, CPUs). A cached split always uses 0.
        balanced_sampler: draw training bags with probability 1 / (count of their class).
        max_instances: training-time random subset size for large bags (None: all instances).
        instance_dropout: training-time probability of dropping each instance.
        center_shift: scale of the training-time centre-shift augmentation (0 = off): each training bag gets a
            random mix of the training centres' mean feature shifts (:mod:`wsi_ncmi.data.center_shift`; needs a
            ``center`` column with two or more training centres, else it is off with a warning).
        cache: ``auto`` (default), ``none``, ``ram`` or ``device``. ``ram`` reads every bag of the splits in use
            once (float16, progress bar, total size logged, values checked once) and serves them from host
            memory; ``device`` keeps them on the trainer's accelerator; ``auto`` picks ``device`` / ``ram``
            when the splits fit ``cache_budget`` and ``none`` (read from disk on every access) otherwise.
            An explicit ``ram`` / ``device`` that does not fit fails before training with the needed and
            available sizes. ``True`` / ``False`` mean ``ram`` / ``none``.
        cache_budget: fraction of the currently available memory (host or accelerator) the cache may use.
        pin_memory: pin host memory (only when CUDA is available).
        label_map: remap labels (keys: label_name or integer label, values: new integer label).
        num_classes: number of classes (default: from the table's labels).
        fold: which fold of a k-fold / leave-one-center-out table.
        seed: seed of instance sampling and of the balanced sampler (with the epoch set by ``set_epoch``).
        _split_bags: this split already resolved against ``bags_dir`` (``preflight_check(...).resolved``): reused
            when it is of the same (bags folder, split CSV, fold), so the folder is listed once. Not a setting:
            not a hyper-parameter, not a CLI option (the leading underscore hides it from LightningCLI).
    """

    def __init__(
        self,
        bags_dir: str,
        split_csv: str,
        batch_size: int = 1,
        num_workers: int | None = None,
        balanced_sampler: bool = False,
        max_instances: int | None = None,
        instance_dropout: float = 0.0,
        center_shift: float = 0.0,
        cache: CacheMode | bool = "auto",
        cache_budget: float = 0.5,
        pin_memory: bool = True,
        label_map: dict[str, int] | None = None,
        num_classes: int | None = None,
        fold: int | None = None,
        seed: int = 0,
        *,
        _split_bags: SplitBags | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["_split_bags"])
        if batch_size < 1:
            raise MILDataError(f"{split_csv}: batch_size must be >= 1, got {batch_size}")
        self.bags_dir = Path(bags_dir)
        self.split_csv = str(split_csv)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.balanced_sampler = balanced_sampler
        self.max_instances = max_instances
        self.instance_dropout = instance_dropout
        if not 0.0 <= center_shift < float("inf"):
            raise MILDataError(f"{split_csv}: center_shift must be a finite number >= 0, got {center_shift}")
        self.center_shift = float(center_shift)
        check_choices(MILDataModule, {"cache": cache}, str(split_csv), MILDataError)
        self.cache: CacheMode = ("ram" if cache else "none") if isinstance(cache, bool) else cache
        self.cache_budget = float(cache_budget)
        #: where ``device`` / ``auto`` caches live: the trainer's root device once ``setup`` ran, else set by
        #: callers that evaluate without a trainer
        self.cache_device = torch.device("cpu")
        self._cache_mode: str | None = None  # resolved mode (none / ram / device) once decided
        self.pin_memory = pin_memory
        self.label_map = dict(label_map) if label_map else None
        self.fold = fold
        self.seed = seed
        try:
            resolved = split_bags_for(self.bags_dir, self.split_csv, fold, _split_bags)  # one listing, headers on demand
        except BagError as exc:
            raise MILDataError(f"{self.split_csv}: {exc}") from exc
        self.table = _apply_label_map(resolved.table, self.label_map, self.split_csv)
        max_label = int(self.table["label"].max())
        if num_classes is None:
            num_classes = max_label + 1
        elif max_label >= num_classes:
            raise MILDataError(f"{self.split_csv}: label {max_label} but num_classes={num_classes}")
        self.num_classes = int(num_classes)
        # record the class count actually used, so model and data hyper-parameters agree in checkpoints
        self.hparams["num_classes"] = self.num_classes
        initial = getattr(self, "_hparams_initial", None)  # what Lightning merges into the logger's hparams
        if initial is not None and "num_classes" in initial:
            initial["num_classes"] = self.num_classes
        self.class_names = self._class_names()
        if resolved.missing:
            raise MILDataError(resolved.missing_message())
        self._resolved = resolved
        #: slide id -> bag file of every slide of the table (resolved once, passed down to the datasets)
        self.bag_paths = resolved.paths
        self.in_dim = int(resolved.header(str(self.table["slide_id"].iloc[0]))[1])
        self._datasets: dict[str, BagDataset] = {}
        self._samplers: weakref.WeakSet[EpochWeightedSampler] = weakref.WeakSet()
        self.epoch = 0
        self._dims_checked = False

    def _class_names(self) -> list[str]:
        names = [str(i) for i in range(self.num_classes)]
        if "label_name" in self.table.columns:
            for label, name in self.table.drop_duplicates("label")[["label", "label_name"]].itertuples(index=False):
                names[int(label)] = str(name)
        return names

    def split_sizes(self) -> dict[str, int]:
        return {s: int((self.table["split"] == s).sum()) for s in SPLITS}

    def check_dims(self) -> None:
        """Every bag of the table has ``in_dim`` features (headers only)."""
        if self._dims_checked:
            return
        odd = {slide: d for slide, d in self._resolved.dims().items() if d != self.in_dim}
        if odd:
            shown = ", ".join(f"{k} (D={v})" for k, v in list(odd.items())[:10])
            raise MILDataError(f"{self.split_csv}: bags have different feature dims; expected D={self.in_dim} "
                               f"(from the first bag), got {shown}")
        self._dims_checked = True

    def dataset(self, split: str) -> BagDataset:
        """The :class:`BagDataset` of one split (``all``: every row), built once, cached per ``cache``."""
        if split not in self._datasets:
            if split != "all" and not (self.table["split"] == split).any():
                raise MILDataError(f"{self.split_csv}: split {split!r} is empty (sizes: {self.split_sizes()})")
            ds = BagDataset(
                self.table, self.bags_dir, split, max_instances=self.max_instances,
                instance_dropout=self.instance_dropout, seed=self.seed, bag_paths=self.bag_paths,
            )
            ds.where = self.split_csv
            ds.set_epoch(self.epoch)
            if self._cache_mode is None:  # used without setup(): decide for every split of the table at once
                self._resolve_cache([s for s in SPLITS if (self.table["split"] == s).any()])
            if self._cache_mode != "none":
                device = self.cache_device if self._cache_mode == "device" else torch.device("cpu")
                try:
                    ds.use_cache(BagCache(ds.paths, device=device, in_dim=self.in_dim,
                                          desc=f"caching {split} bags ({self._cache_mode})"))
                except BagError as exc:
                    raise MILDataError(f"{self.split_csv}: {exc}") from exc
            if self.center_shift > 0 and ds.train:
                ds.center_shift = fit_center_shift(ds._features, ds.table, self.center_shift, self.split_csv)
            self._datasets[split] = ds
        return self._datasets[split]

    def _resolve_cache(self, splits: Sequence[str]) -> str:
        """Decide ``none`` / ``ram`` / ``device`` once, for the bags of ``splits`` together."""
        if self._cache_mode is None:
            if self.cache == "none":
                self._cache_mode = "none"
            else:
                ids = self.table.loc[self.table["split"].isin(list(splits)), "slide_id"]
                needed = headers_nbytes(self._resolved.header(s) for s in ids)
                try:
                    self._cache_mode = resolve_cache_mode(self.cache, needed, self.cache_device, self.cache_budget,
                                                          self.split_csv)
                except CacheError as exc:
                    raise MILDataError(str(exc)) from exc
                log.info("bag cache: %s (%s needed for splits %s, cache=%s)", self._cache_mode,
                         f"{needed / 2**30:.2f} GiB", "/".join(splits), self.cache)
                if self._cache_mode != "none" and self.num_workers:
                    log.info("%s: bags are cached; num_workers=%d is not used (cached splits load in the main "
                             "process)", self.split_csv, self.num_workers)
        return self._cache_mode

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        splits = needed.get(stage or "fit", ("train", "val"))
        self.check_dims()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self._cache_mode is None:
            self.cache_device = trainer.strategy.root_device
        self._resolve_cache([s for s in splits if (self.table["split"] == s).any()])
        for split in splits:
            self.dataset(split)

    def num_workers_for(self, ds: BagDataset) -> int:
        """DataLoader workers for ``ds``: 0 when it is cached, else ``num_workers`` or min(4, CPUs)."""
        if ds.features_cache is not None:
            return 0
        return self.num_workers if self.num_workers is not None else min(4, os.cpu_count() or 1)

    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch of every dataset and balanced sampler built here (and those built later)."""
        self.epoch = int(epoch)
        for ds in self._datasets.values():
            ds.set_epoch(self.epoch)
            if ds.features_cache is not None:
                ds.features_cache.changed_on_disk()  # warns once per changed bag; the cached copy stays in use
        for sampler in list(self._samplers):
            sampler.set_epoch(self.epoch)

    def _sampler(self, ds: BagDataset) -> EpochWeightedSampler:
        counts = np.bincount(ds.labels, minlength=self.num_classes)
        weights = torch.as_tensor([1.0 / counts[y] for y in ds.labels], dtype=torch.double)  # [N]
        sampler = EpochWeightedSampler(weights, num_samples=len(ds), seed=self.seed, epoch=self.epoch)
        self._samplers.add(sampler)
        return sampler

    def dataloader(self, split: str, shuffle: bool = False, balanced: bool = False) -> DataLoader:
        """A loader over one split (``all``: every row) in table order unless ``shuffle``/``balanced``.

        Training loaders do not keep their workers between epochs: each epoch's workers get a fresh copy of
        the dataset and with it the epoch set by ``set_epoch`` (persistent workers would keep a stale one).
        """
        ds = self.dataset(split)
        sampler = self._sampler(ds) if balanced else None
        workers = self.num_workers_for(ds)
        on_host = ds.features_cache is None or ds.features_cache.device.type == "cpu"
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_bags,
            pin_memory=self.pin_memory and on_host and torch.cuda.is_available(),
            persistent_workers=workers > 0 and not ds.train,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True, balanced=self.balanced_sampler)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("test")
