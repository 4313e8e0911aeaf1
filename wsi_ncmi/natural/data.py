"""Natural-image data for the NCMI image track: CIFAR-100, ImageFolder trees (ImageNet) and sklearn digits.

Sources (``ImageDataModule(dataset=...)``):

* ``cifar100`` — the standard python-pickle release, a folder ``cifar-100-python/`` holding ``train``,
  ``test`` and ``meta``. Nothing is downloaded. The pickles are read with
  :class:`~wsi_ncmi.natural.datasets.RestrictedUnpickler`, which only reconstructs builtins containers and
  numpy arrays (arbitrary pickles can execute code). The test split doubles as the validation split, as in the paper.
* ``imagefolder`` — ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (ImageNet layout,
  classes are the sorted folder names of ``train``).
* ``digits`` — scikit-learn's bundled ``load_digits`` (1797 real 8×8 handwritten digits, 10 classes),
  upsampled to ``image_size`` and replicated to 3 channels, with a fixed seeded stratified split
  (default 80/20). For tests and quick CPU demos.

The CIFAR-100 and digits datasets themselves are :mod:`wsi_ncmi.natural.datasets`; this module holds the
transforms, the source registry and the datamodule.

Augmentations (``build_transform``): CIFAR random crop 32 / padding 4 + horizontal flip; ImageNet
RandomResizedCrop + flip, eval resize to ``eval_size / crop_pct`` then center crop ``eval_size``
(the paper also evaluates ImageNet at 280 px: ``eval_size=280``); digits: small random shifts, no flip.
``two_views=True`` returns two independent augmentations per image, stacked ``[V=2, 3, H, W]``,
for SupCon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from wsi_ncmi.choices import check_choices

from .datasets import CIFAR100, DigitsDataset, ImageDataError, cifar100_class_names, load_digits_arrays

__all__ = [
    "build_transform",
    "TwoViews",
    "ImageDataModule",
    "DATASETS",
    "DatasetName",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)

# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


class TwoViews:
    """Apply ``transform`` ``views`` times to one image -> stacked ``[V, 3, H, W]`` (SupCon input)."""

    def __init__(self, transform: Callable, views: int = 2) -> None:
        self.transform = transform
        self.views = views

    def __call__(self, img: Any) -> Tensor:
        return torch.stack([self.transform(img) for _ in range(self.views)])


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list:
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _cifar_transform(train: bool, image_size: int, eval_size: int, crop_pct: float) -> Callable:
    from torchvision.transforms import v2

    ops: list = []
    if train:
        ops += [v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]
    elif eval_size != 32:
        ops += [v2.Resize(eval_size, antialias=True)]
    return v2.Compose(ops + _to_float(CIFAR100_MEAN, CIFAR100_STD))


def _imagenet_transform(train: bool, image_size: int, eval_size: int, crop_pct: float) -> Callable:
    from torchvision.transforms import v2

    if train:
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = int(round(eval_size / crop_pct))
        ops = [v2.Resize(resize, antialias=True), v2.CenterCrop(eval_size)]
    return v2.Compose([v2.ToImage(), *ops, *_to_float(IMAGENET_MEAN, IMAGENET_STD)[1:]])


def _digits_transform(train: bool, image_size: int, eval_size: int, crop_pct: float) -> Callable:
    from torchvision.transforms import v2

    ops: list = []
    if train:  # digits are not mirror-symmetric: shifts only
        ops += [v2.RandomCrop(image_size, padding=max(1, image_size // 16))]
    if not train and eval_size != image_size:
        ops += [v2.Resize(eval_size, antialias=True)]
    return v2.Compose(ops + _to_float(DIGITS_MEAN, DIGITS_STD))


# family -> builder(train, image_size, eval_size, crop_pct)
_TRANSFORMS: dict[str, Callable[[bool, int, int, float], Callable]] = {
    "cifar": _cifar_transform,
    "imagenet": _imagenet_transform,
    "digits": _digits_transform,
}
TransformFamily = Literal[tuple(_TRANSFORMS)]  # type: ignore[valid-type]  # the builders' names


def build_transform(
    family: TransformFamily, train: bool, image_size: int, eval_size: int | None = None, crop_pct: float = 0.875
) -> Callable:
    """Image transform for ``family`` in {cifar, imagenet, digits}; output float [3, H, W], normalised.

    ``eval_size`` (default ``image_size``) is the evaluation resolution; for ``imagenet`` evaluation
    resizes the short side to ``eval_size / crop_pct`` and center-crops ``eval_size``.
    """
    check_choices(build_transform, {"family": family}, "transform", ImageDataError)
    if not 0 < crop_pct <= 1:
        raise ImageDataError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return _TRANSFORMS[family](train, image_size, eval_size or image_size, crop_pct)


# --------------------------------------------------------------------------------------------------
# dataset sources (registry) + Lightning datamodule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    family: str  # transform family
    image_size: int  # default train resolution
    needs_root: bool
    build: Callable[[ImageDataModule, bool, Callable], Dataset]  # (dm, train, transform) -> dataset
    class_names: Callable[[ImageDataModule], list[str]]


def _build_cifar(dm: ImageDataModule, train: bool, transform: Callable) -> Dataset:
    return CIFAR100(dm.root, train=train, transform=transform)


def _cifar_names(dm: ImageDataModule) -> list[str]:
    return cifar100_class_names(dm.root)


def _imagefolder_dir(dm: ImageDataModule, train: bool) -> Path:
    split = dm.train_dir if train else dm.val_dir
    path = Path(dm.root).expanduser() / split
    if not path.is_dir():
        raise ImageDataError(
            f"ImageFolder split not found: {path} (expected <root>/{dm.train_dir}/<class>/<image> and "
            f"<root>/{dm.val_dir}/<class>/<image>)"
        )
    return path


def _build_imagefolder(dm: ImageDataModule, train: bool, transform: Callable) -> Dataset:
    from torchvision.datasets import ImageFolder

    path = _imagefolder_dir(dm, train)
    ds = ImageFolder(str(path), transform=transform)
    if ds.classes != dm.class_names:
        raise ImageDataError(f"{path}: class folders {ds.classes[:5]}... differ from the train split's")
    return ds


def _imagefolder_names(dm: ImageDataModule) -> list[str]:
    path = _imagefolder_dir(dm, True)
    names = sorted(e.name for e in path.iterdir() if e.is_dir())
    if len(names) < 2:
        raise ImageDataError(f"{path}: need at least 2 class folders, found {len(names)}")
    return names


def _build_digits(dm: ImageDataModule, train: bool, transform: Callable) -> Dataset:
    arrays = load_digits_arrays(dm.image_size, seed=dm.seed)["train" if train else "test"]
    return DigitsDataset(*arrays, transform=transform)


DATASETS: dict[str, _Source] = {
    "cifar100": _Source("cifar", 32, True, _build_cifar, _cifar_names),
    "imagefolder": _Source("imagenet", 224, True, _build_imagefolder, _imagefolder_names),
    "digits": _Source("digits", 32, False, _build_digits, lambda dm: [str(i) for i in range(10)]),
}
#: the dataset names as a type (jsonargparse validates them, ``--help`` lists them); built from the keys
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]


class ImageDataModule(L.LightningDataModule):
    """Lightning datamodule for the natural-image track.

    Batches are ``(images [B, 3, H, W], labels [B])``, or ``(images [B, 2, 3, H, W], labels)`` with
    ``two_views=True``. ``num_classes`` and ``class_names`` are known right after construction
    (CIFAR reads ``meta``, ImageFolder lists the class folders of the train split).

    Args:
        dataset: ``cifar100`` | ``imagefolder`` | ``digits``.
        root: CIFAR-100 folder (or its parent) / ImageFolder root; unused for ``digits``.
        batch_size, num_workers, pin_memory: loader settings.
        image_size: train resolution (default 32 for CIFAR/digits, 224 for ImageFolder).
        eval_size: evaluation resolution (default ``image_size``; the paper also reports 280 on ImageNet).
        crop_pct: eval center-crop fraction for ImageFolder.
        two_views: two augmented views per training image (SupCon).
        train_dir, val_dir: ImageFolder split folder names.
        limit_train, limit_val: keep a seeded random subset of this many samples (quick runs).
        seed: digits split / subset seed.
    """

    def __init__(
        self,
        dataset: DatasetName = "cifar100",
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = True,
        image_size: int | None = None,
        eval_size: int | None = None,
        crop_pct: float = 0.875,
        two_views: bool = False,
        train_dir: str = "train",
        val_dir: str = "val",
        limit_train: int | None = None,
        limit_val: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choices(ImageDataModule, {"dataset": dataset}, "ImageDataModule", ImageDataError)
        self.source = DATASETS[dataset]
        if self.source.needs_root and not root:
            raise ImageDataError(f"data.root is required for dataset={dataset!r}")
        if batch_size < 1:
            raise ImageDataError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.image_size = image_size or self.source.image_size
        self.eval_size = eval_size or self.image_size
        self.crop_pct = crop_pct
        self.two_views = two_views
        self.train_dir, self.val_dir = train_dir, val_dir
        self.limit_train, self.limit_val = limit_train, limit_val
        self.seed = seed
        self.class_names: list[str] = self.source.class_names(self)
        self.num_classes = len(self.class_names)
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._train_eval: Dataset | None = None

    # -- datasets ---------------------------------------------------------------------------------
    def transform(self, train: bool) -> Callable:
        t = build_transform(self.source.family, train, self.image_size, self.eval_size, self.crop_pct)
        return TwoViews(t) if (train and self.two_views) else t

    def _subset(self, ds: Dataset, limit: int | None) -> Dataset:
        if limit is None or limit >= len(ds):  # type: ignore[arg-type]
            return ds
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(ds), generator=g)[:limit].tolist()  # type: ignore[arg-type]
        return Subset(ds, idx)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None and stage in (None, "fit"):
            self._train = self._subset(self.source.build(self, True, self.transform(True)), self.limit_train)
        if self._val is None:
            self._val = self._subset(self.source.build(self, False, self.transform(False)), self.limit_val)

    def train_eval_dataset(self) -> Dataset:
        """The training split with evaluation transforms (closed-form centroids, linear probing)."""
        if self._train_eval is None:
            ds = self.source.build(self, True, self.transform(False))
            self._train_eval = self._subset(ds, self.limit_train)
        return self._train_eval

    # -- loaders ----------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self._train is not None
        # drop_last keeps BatchNorm and the in-batch NCMI Γ away from a 1-sample tail batch
        return self._loader(self._train, shuffle=True, drop_last=len(self._train) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self._val is not None
        return self._loader(self._val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def train_eval_dataloader(self) -> DataLoader:
        """Un-augmented, un-shuffled training loader (single view)."""
        return self._loader(self.train_eval_dataset(), shuffle=False)
