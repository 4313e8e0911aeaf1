"""Natural-image data: CIFAR-100 pickle folder (restricted unpickler), digits, ImageFolder, transforms."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ncmi.natural.data import ImageDataModule, build_transform
from wsi_ncmi.natural.datasets import CIFAR100, ImageDataError, load_digits_arrays, safe_unpickle


def _write_fake_cifar(root: Path, n_train: int = 12, n_test: int = 6, protocol: int = 2) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        blob = {
            b"data": data,
            b"fine_labels": [(7 * i) % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh, protocol=protocol)
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)]}
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_fake_cifar100_loads_with_correct_shapes_and_labels(tmp_path: Path, protocol: int) -> None:
    folder = _write_fake_cifar(tmp_path, protocol=protocol)
    raw = pickle.loads((folder / "train").read_bytes())
    ds = CIFAR100(tmp_path, train=True)  # the parent of cifar-100-python works
    assert len(ds) == 12
    assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
    # channel-first rows of 1024 values: R plane, then G, then B
    np.testing.assert_array_equal(ds.images[3, :, :, 1], raw[b"data"][3, 1024:2048].reshape(32, 32))
    assert [ds[i][1] for i in range(12)] == [(7 * i) % 100 for i in range(12)]
    assert ds.classes[0] == "class_0" and len(ds.classes) == 100
    img, label = ds[5]
    assert img.shape == (3, 32, 32) and label == 35
    test = CIFAR100(folder, train=False)  # the folder itself works too
    assert len(test) == 6


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = _write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned_by_pickle"
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"fine_labels": [0]}, fh)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ImageDataError, match="not allowed"):
            CIFAR100(tmp_path, train=True)
    finally:
        os.chdir(cwd)
    assert not marker.exists()


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(pickle.dumps({"f": np.array}))  # a global function, not array reconstruction
    with pytest.raises(ImageDataError, match="numpy"):
        safe_unpickle(path)


def test_missing_cifar_folder_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match="cifar-100-python/train"):
        CIFAR100(tmp_path / "nowhere")


def test_bad_cifar_data_shape_is_rejected(tmp_path: Path) -> None:
    folder = _write_fake_cifar(tmp_path)
    with open(folder / "train", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, fh)
    with pytest.raises(ImageDataError, match="uint8 \\[N, 3072\\]"):
        CIFAR100(folder)


def test_cifar_datamodule_batches_and_class_names(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path, n_train=10, n_test=4)
    dm = ImageDataModule("cifar100", root=str(tmp_path), batch_size=4, num_workers=0)
    assert dm.num_classes == 100 and dm.class_names[99] == "class_99"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32)


def test_datamodule_requires_root_for_cifar() -> None:
    with pytest.raises(ImageDataError, match="data.root"):
        ImageDataModule("cifar100")
    with pytest.raises(ImageDataError, match="ImageDataModule: dataset must be one of"):
        ImageDataModule("mnist")


def test_digits_are_real_upsampled_and_split_deterministically() -> None:
    a = load_digits_arrays(image_size=16, seed=0)
    b = load_digits_arrays(image_size=16, seed=0)
    xtr, ytr = a["train"]
    xte, yte = a["test"]
    assert xtr.shape[1:] == (3, 16, 16) and xtr.dtype == torch.uint8
    assert len(ytr) + len(yte) == 1797 and len(yte) == 360
    assert torch.equal(ytr, b["train"][1]) and torch.equal(xte, b["test"][0])
    assert torch.equal(xtr[:, 0], xtr[:, 2])  # grey replicated to 3 channels
    assert set(yte.tolist()) == set(range(10))
    c = load_digits_arrays(image_size=16, seed=1)
    assert not torch.equal(c["test"][1], yte)


def test_digits_two_views_and_train_eval_loader() -> None:
    dm = ImageDataModule("digits", batch_size=8, num_workers=0, image_size=16, two_views=True, limit_train=40)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 3, 16, 16) and y.shape == (8,)
    assert not torch.equal(x[:, 0], x[:, 1])  # independent random crops
    xe, _ = next(iter(dm.train_eval_dataloader()))
    assert xe.shape == (8, 3, 16, 16)
    assert len(dm.train_eval_dataset()) == 40


def test_imagenet_transforms_train_and_eval_sizes() -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    train = build_transform("imagenet", True, 224)
    ev = build_transform("imagenet", False, 224, eval_size=280)
    assert train(img).shape == (3, 224, 224)
    assert ev(img).shape == (3, 280, 280)
    cifar_train = build_transform("cifar", True, 32)
    out = cifar_train(torch.zeros(3, 32, 32, dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ImageDataError, match="family"):
        build_transform("svhn", True, 32)


def _write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_imagefolder_datamodule(tmp_path: Path) -> None:
    root = _write_imagefolder(tmp_path)
    dm = ImageDataModule("imagefolder", root=str(root), batch_size=4, num_workers=0, image_size=32, eval_size=36)
    assert dm.class_names == ["cat", "dog", "eel"] and dm.num_classes == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 36, 36) and yv.tolist() == [0, 0, 0, 1]
    with pytest.raises(ImageDataError, match="ImageFolder split not found"):
        ImageDataModule("imagefolder", root=str(tmp_path / "missing"))
