"""The natural-image datasets behind ``ImageDataModule``: CIFAR-100 pickles (read safely) and sklearn digits.

* ``CIFAR100`` — the standard python-pickle release, a folder ``cifar-100-python/`` holding ``train``,
  ``test`` and ``meta``; nothing is downloaded. The pickles are read with :class:`RestrictedUnpickler`,
  which only reconstructs builtins containers and numpy arrays (arbitrary pickles can execute code).
* ``DigitsDataset`` — scikit-learn's bundled ``load_digits`` (1797 real 8×8 handwritten digits, 10 classes)
  with a fixed seeded stratified split (:func:`load_digits_arrays`).

Errors are :class:`ImageDataError` (a ``ValueError`` naming the path and the problem). ImageFolder trees are
read by torchvision; transforms and the datamodule are :mod:`wsi_ncmi.natural.data`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsi_ncmi.errors import UserError

__all__ = [
    "CIFAR100",
    "CIFAR100_LAYOUT",
    "DigitsDataset",
    "ImageDataError",
    "RestrictedUnpickler",
    "cifar100_class_names",
    "load_cifar100_split",
    "load_digits_arrays",
    "safe_unpickle",
]


CIFAR100_LAYOUT = (
    "expected the CIFAR-100 python release (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, "
    "extracted; nothing is downloaded):\n"
    "  <root>/cifar-100-python/train   (50000 images)\n"
    "  <root>/cifar-100-python/test    (10000 images)\n"
    "  <root>/cifar-100-python/meta\n"
    "where <root> may also be the cifar-100-python folder itself"
)


class ImageDataError(UserError):
    """A natural-image dataset is missing, malformed or unsafe (names the path and the problem)."""


# --------------------------------------------------------------------------------------------------
# restricted unpickling (CIFAR-100's own format only)
# --------------------------------------------------------------------------------------------------

# (module, name) pairs a CIFAR pickle needs: numpy array reconstruction (numpy 1 and 2 spellings,
# protocol <=4 `_reconstruct` and protocol 5 `_frombuffer`), dtypes, and `_codecs.encode`
# which Python 3 protocol-2 pickles use for bytes. None of them can run arbitrary code.
_SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array / dtype reconstruction.

    Plain containers (dict, list, tuple, str, bytes, int, float) need no global and load as usual.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")


def safe_unpickle(path: str | Path) -> Any:
    """Load a CIFAR-style pickle with :class:`RestrictedUnpickler` (latin1 for Python-2 pickles).

    Raises :class:`ImageDataError` naming ``path`` when it is missing or refused.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageDataError(f"{path}: cannot read ({err})") from err
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise ImageDataError(f"{path}: refused or malformed pickle ({err})") from err
    return obj


def _key(d: dict, name: str) -> Any:
    """Look up ``name`` in a dict whose keys may be ``str`` or ``bytes`` (Python-2 pickles)."""
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def _decode(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _cifar_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for cand in (root, root / "cifar-100-python"):
        if all((cand / f).is_file() for f in ("train", "test", "meta")):
            return cand
    raise ImageDataError(f"CIFAR-100 not found at {root}: {CIFAR100_LAYOUT}")


def load_cifar100_split(root: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one CIFAR-100 split -> (images uint8 [N, 32, 32, 3], fine labels int64 [N], class names)."""
    folder = _cifar_folder(root)
    path = folder / ("train" if train else "test")
    blob = safe_unpickle(path)
    meta = safe_unpickle(folder / "meta")
    try:
        raw = np.asarray(_key(blob, "data"))
        labels = np.asarray(_key(blob, "fine_labels"), dtype=np.int64)
        names = [_decode(n) for n in _key(meta, "fine_label_names")]
    except (KeyError, TypeError) as err:
        raise ImageDataError(f"{path}: not a CIFAR-100 pickle (missing key {err})") from err
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise ImageDataError(f"{path}: 'data' must be uint8 [N, 3072], got {raw.dtype} {raw.shape}")
    if labels.shape != (raw.shape[0],):
        raise ImageDataError(f"{path}: {labels.shape[0]} labels for {raw.shape[0]} images")
    if len(names) != 100 or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(names):
        raise ImageDataError(f"{path}: labels must lie in [0, {len(names)}) with 100 class names")
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 32, 32, 3] HWC
    return np.ascontiguousarray(images), labels, names


class CIFAR100(Dataset):
    """CIFAR-100 (fine labels) from the local python-pickle folder; items ``(image, label)``."""

    def __init__(self, root: str | Path, train: bool = True, transform: Callable | None = None) -> None:
        self.images, self.targets, self.classes = load_cifar100_split(root, train)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        img = torch.from_numpy(self.images[idx]).permute(2, 0, 1)  # [3, 32, 32] uint8
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[idx])


# --------------------------------------------------------------------------------------------------
# digits (sklearn, real images bundled with the package)
# --------------------------------------------------------------------------------------------------


def load_digits_arrays(
    image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """sklearn digits as uint8 images [N, 3, S, S] (bilinear upsampling of the 8×8 originals).

    Returns ``{"train": (images, labels), "test": (images, labels)}``; the stratified split is fixed by
    ``seed`` so every call gives the same partition.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.from_numpy(ds.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # [N, 3, S, S]
    y = torch.from_numpy(ds.target.astype(np.int64))
    idx_tr, idx_te = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=ds.target
    )
    return {
        "train": (x[torch.from_numpy(idx_tr)], y[torch.from_numpy(idx_tr)]),
        "test": (x[torch.from_numpy(idx_te)], y[torch.from_numpy(idx_te)]),
    }


class DigitsDataset(Dataset):
    """In-memory uint8 image tensor dataset; items ``(transform(image), label)``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable | None = None) -> None:
        self.images = images  # [N, 3, S, S] uint8
        self.targets = labels  # [N]
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        img = self.images[idx]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[idx])


def cifar100_class_names(root: str | Path) -> list[str]:
    """The 100 fine label names from ``meta`` of the CIFAR-100 folder at ``root``."""
    meta = safe_unpickle(_cifar_folder(root) / "meta")
    try:
        return [_decode(n) for n in _key(meta, "fine_label_names")]
    except (KeyError, TypeError) as err:
        raise ImageDataError(f"{root}: CIFAR-100 meta lacks fine_label_names") from err
