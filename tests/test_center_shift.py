"""Centre-shift augmentation of training bags (wsi_ncmi.data.center_shift, MILDataModule(center_shift=...))."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.data.center_shift import centre_directions
from wsi_ncmi.data.mil import MILDataError


def test_centre_directions_are_label_balanced() -> None:
    rng = np.random.default_rng(0)
    d = 6
    offsets = {0: np.eye(d)[0] * 3.0, 1: np.eye(d)[1] * -2.0, 2: np.zeros(d)}
    tumour = np.eye(d)[2] * 5.0
    means, centres, labels = [], [], []
    for k, share in ((0, 0.1), (1, 0.5), (2, 0.9)):  # the centres' tumour shares differ a lot
        for i in range(40):
            y = int(i < 40 * share)
            means.append(offsets[k] + y * tumour + 0.01 * rng.standard_normal(d))
            centres.append(k)
            labels.append(y)
    dirs = centre_directions(np.stack(means), centres, labels)  # [3, D]
    want = np.stack([offsets[k] for k in range(3)])
    want -= want.mean(0)
    assert dirs.shape == (3, d) and np.allclose(dirs, want, atol=0.02)  # no tumour in the centre directions
    plain = np.stack([np.stack(means)[np.asarray(centres) == k].mean(0) for k in range(3)])
    assert not np.allclose(plain - plain.mean(0), want, atol=0.5)  # a plain centre mean would carry tumour
    assert centre_directions(np.stack(means)[:5], [1] * 5, labels[:5]) is None


def _with_centres(tmp_path: Path, centres: list[int] | None) -> tuple[Path, Path]:
    bags = tmp_path / "bags"
    split = make_witness_bags(bags, n_slides=18, num_classes=3, dim=8, n_instances=(4, 9))
    table = pd.read_csv(split)
    if centres is not None:
        table["center"] = [centres[i % len(centres)] for i in range(len(table))]
    out = tmp_path / "split.csv"
    table.to_csv(out, index=False)
    return bags, out


def _dm(bags: Path, split: Path, **kw) -> MILDataModule:
    return MILDataModule(str(bags), str(split), num_workers=0, cache="ram", pin_memory=False, **kw)


def test_training_bags_get_one_shift_per_bag_and_epoch_and_nothing_else_changes(tmp_path: Path) -> None:
    bags, split = _with_centres(tmp_path, [0, 1, 2])
    plain, shifted = _dm(bags, split, instance_dropout=0.3), _dm(bags, split, instance_dropout=0.3, center_shift=1.0)
    train, aug = plain.dataset("train"), shifted.dataset("train")
    assert aug.center_shift is not None and aug.center_shift.directions.shape == (3, 8)
    deltas = []
    for i in range(len(train)):
        a, b = train[i]["features"].float(), aug[i]["features"].float()
        assert a.shape == b.shape  # the instance-dropout draws are the same with the augmentation on
        delta = b - a  # [N, D]: one shift shared by every instance of the bag
        assert torch.allclose(delta, delta[:1].expand_as(delta), atol=2e-2) and float(delta.abs().max()) > 1e-3
        assert torch.equal(aug[i]["features"], b.to(aug[i]["features"].dtype))  # deterministic for the epoch
        deltas.append(delta[0])
    assert not torch.allclose(deltas[0], deltas[1])  # each bag its own draw
    shifted.set_epoch(1)
    assert not torch.allclose(aug[0]["features"].float() - train[0]["features"].float(), deltas[0], atol=1e-3)
    for split_name in ("val", "test"):  # never outside training
        v0, v1 = plain.dataset(split_name), shifted.dataset(split_name)
        assert v1.center_shift is None
        assert all(torch.equal(v0[i]["features"], v1[i]["features"]) for i in range(len(v0)))


@pytest.mark.parametrize("centres", [None, [4]])
def test_without_two_training_centres_it_is_off_with_a_warning(tmp_path: Path, centres: list[int] | None,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    bags, split = _with_centres(tmp_path, centres)
    with caplog.at_level(logging.WARNING, logger="wsi_ncmi.data.center_shift"):
        ds = _dm(bags, split, center_shift=1.0).dataset("train")
    assert ds.center_shift is None
    assert str(split) in caplog.text and "the augmentation is off" in caplog.text


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_scale_is_refused_naming_the_split(tmp_path: Path, bad: float) -> None:
    bags, split = _with_centres(tmp_path, [0, 1])
    with pytest.raises(MILDataError, match=f"{split}: center_shift must be a finite number >= 0"):
        _dm(bags, split, center_shift=bad)
